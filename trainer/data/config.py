"""The training data loader's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class LoaderConfig:
    """Where the shards are and how batches are formed; see ``trainer/data/loader.py``."""

    path: str | list[str]  # dataset dir(s) written by `tessera data ingest`, local or s3://
    batch_size: int = 32  # per rank
    num_workers: int = 4  # DataLoader worker processes per rank
    seed: int = 0
    # Samples mixed: a reader interleaves consecutive shards of its span until they hold this many (its shuffle
    # window), and within a shard each bucket's keys pass a shuffle buffer of this size; <= 1 keeps tar order.
    shuffle_buffer: int = 1000
    verify: Literal["first_open", "always", "never"] = "first_open"  # sha256 against the manifest
    caption_variants: dict[str, float] = field(default_factory=lambda: {"alt": 1.0})  # variant -> ratio
    variant_fallback_order: list[str] | None = None  # None: configured variants by decreasing ratio
    partial_buckets: Literal["carry", "drop"] = "carry"  # at epoch end
    use_precomputed: bool = True  # use latents / text embeddings for the ids below when configured
    text_encoder_id: str | None = None  # KEY.emb.<id>.<variant>.safetensors
    autoencoder_id: str | None = None  # KEY.latent.<id>.safetensors replaces the image
    # Control conditions each sample carries (KEY.cond.<name>.png, `tessera data condition`); batches get
    # batch["cond"][name]. A training config with model.control adds its condition here.
    conditions: list[str] = field(default_factory=list)
    prefetch_factor: int = 2  # batches in flight per worker
    drop_invalid: bool = True  # False: raise on the first bad sample or corrupt shard (debugging)
    epochs: int | None = None  # None: iterate forever; else stop after this epoch count
    # Nodes: ranks per node (None: LOCAL_WORLD_SIZE, else SLURM_NTASKS_PER_NODE, else one node). The plan depends
    # only on ranks x workers; a node's readers share its shard cache.
    ranks_per_node: int | None = None
    # S3 datasets go through a node-local shard cache: each shard downloaded once per node. "{node}" in the path is
    # replaced by the node index (tests run several "nodes" on one machine). None: <tmp>/tessera-shard-cache.
    cache_dir: str | None = None
    cache_gb: float | None = None  # cache bound; None: half the free space of cache_dir's disk at start
    prefetch_shards: int = 2  # shards each reader downloads ahead of its current shuffle window
    download_threads: int = 4  # concurrent ranged GETs per shard download
    download_part_mb: int = 8  # bytes per ranged GET
    lock_timeout_s: float = 600.0  # longest wait for another process's download or for cache room, then an error

    def __post_init__(self) -> None:
        if isinstance(self.path, str):
            self.path = [self.path]
        if not self.path:
            raise ValueError("path must name at least one dataset")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not self.caption_variants or any(r < 0 for r in self.caption_variants.values()):
            raise ValueError("caption_variants must map at least one variant to a ratio >= 0")
        if sum(self.caption_variants.values()) <= 0:
            raise ValueError("caption_variants ratios must not all be 0")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1 or null, got {self.ranks_per_node}")
        if self.cache_gb is not None and self.cache_gb <= 0:
            raise ValueError(f"cache_gb must be > 0 or null, got {self.cache_gb}")
        if self.prefetch_shards < 0 or self.download_threads < 1 or self.download_part_mb < 1:
            raise ValueError("prefetch_shards >= 0, download_threads >= 1 and download_part_mb >= 1 are required")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or null, got {self.epochs}")

    @property
    def paths(self) -> list[str]:
        """The dataset roots as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def text_encoder(self) -> str | None:
        """The encoder id whose embeddings batches carry, if precomputed inputs are on."""
        return self.text_encoder_id if self.use_precomputed else None

    @property
    def autoencoder(self) -> str | None:
        """The autoencoder id whose latents replace images, if precomputed inputs are on."""
        return self.autoencoder_id if self.use_precomputed else None
