"""Training data: bucketed batches from `tessera data ingest` shards, with exact and elastic resume."""

from tessera.trainer.data.config import LoaderConfig
from tessera.trainer.data.loader import TrainLoader, build_loader, merge_rank_states

__all__ = ["LoaderConfig", "TrainLoader", "build_loader", "merge_rank_states"]
