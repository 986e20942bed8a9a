"""Fixtures for recaption tests: a small real emoji ingest and tiny random VLMs saved as real checkpoint dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.config import from_dict
from tessera.recaption.config import RecaptionConfig
from tests.recaption.tiny_vlms import build_tiny_blip, build_tiny_qwen2vl

RAY = {"num_cpus": 2, "object_store_memory_mb": 200}


def make_cfg(source, output, captioners: list[dict], **kw) -> RecaptionConfig:
    """A local-executor recaption config (tests pass ``executor="ray"`` to use the session's Ray runtime)."""
    data = {"source": str(source), "output": str(output), "captioners": captioners, "executor": "local",
            "batch_size": 4, "window": 16, "ray": RAY, **kw}
    return from_dict(RecaptionConfig, data, "test")


def qwen_captioner(model: Path, variant: str = "vlm_short", **hf) -> dict:
    """A chat captioner section on the tiny Qwen2-VL (short generations keep tests fast)."""
    return {"name": "hf", "variant": variant,
            "hf": {"model": str(model), "sampling": {"max_new_tokens": 10}, **hf}}


def blip_captioner(model: Path, variant: str = "blip", **hf) -> dict:
    """A plain-prompt captioner section on the tiny BLIP."""
    return {"name": "hf", "variant": variant,
            "hf": {"model": str(model), "prompt": "a picture of", "keep_prompt": True,
                   "sampling": {"max_new_tokens": 8}, **hf}}


@pytest.fixture(scope="session")
def emoji_ds(tmp_path_factory) -> Path:
    """39 real emoji (alt and name variants; one near-duplicate rejected) in 3 shards of 32x32 images."""
    from tessera.data_pipeline.ingest import IngestConfig, run_ingest

    out = tmp_path_factory.mktemp("rc_src") / "ds"
    cfg = from_dict(IngestConfig, {"sources": [{"name": "emoji", "limit": 40}], "output": str(out),
                                   "samples_per_shard": 16, "executor": "local", "max_task_retries": 0,
                                   "process": {"min_side": 32, "buckets": {"base_resolution": 32, "multiple": 16}}},
                    "test")
    run_ingest(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A random Qwen2-VL (hidden 32, 2 layers) with a chat template, saved with save_pretrained."""
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("vlm") / "qwen2vl")


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A random BLIP (hidden 32, 2 layers) with a vocab-file tokenizer, saved with save_pretrained."""
    return build_tiny_blip(tmp_path_factory.mktemp("vlm") / "blip")
