"""Session-wide test setup: offline hubs, offline W&B, the loopback S3 server fixtures."""

import os

# Before anything imports transformers/wandb/deepspeed: no hub, no telemetry, CPU accelerator by detection.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_SILENT", "true")
if not os.environ.get("WANDB_API_KEY"):
    os.environ.setdefault("WANDB_MODE", "offline")

pytest_plugins = ["tests.fixtures.s3"]
