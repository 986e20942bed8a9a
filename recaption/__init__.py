"""Re-captioning: VLM (or measured) captions written as caption variants into a derived dataset.

    tessera data recaption --config configs/recaption/attributes.yaml [key=value ...] [--dry-run]

``run.run_recaption(cfg) -> manifest`` is the stage as one function; ``config`` holds its typed config,
``captioners`` the registry (``hf``, ``vllm``, ``attributes``), ``filters`` the quality checks and ``worker`` the
per-shard job that runs in-process or as a Ray actor.
"""
