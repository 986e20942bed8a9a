"""DreamBooth-style prior preservation (Ruiz et al. 2023; diffusers' ``train_dreambooth*.py
--with_prior_preservation``): a second dataset of class images (what the base model draws for the class prompt,
e.g. "a photo of a dog") is trained on beside the subject's, so that fine-tuning on a few subject images does not
drift the class prior. The loop adds ``prior.weight`` times the class batch's loss to the subject batch's.

``PairedLoader`` zips the subject loader with a class loader over ``prior.path`` (the same loader code, so shards,
buckets, precomputed embeddings and exact resume behave alike); the class loader cycles for as long as the subject
data lasts. Its position is saved beside the subject loader's, so a resume replays both streams exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from tessera.trainer.data.config import LoaderConfig
from tessera.trainer.data.loader import TrainLoader


@dataclass(kw_only=True)
class PriorConfig:
    """The class-image dataset and the weight of its loss (diffusers' ``--prior_loss_weight``, default 1.0)."""

    path: str | list[str]  # dataset dir(s) of class images in the ingest format (docs/training.md: making one)
    weight: float = 1.0
    batch_size: int | None = None  # per rank; None: data.batch_size (diffusers pairs one class image per subject one)

    def __post_init__(self) -> None:
        if isinstance(self.path, str):
            self.path = [self.path]
        if not self.path:
            raise ValueError("prior.path must name at least one dataset of class images")
        if self.weight < 0:
            raise ValueError(f"prior.weight must be >= 0, got {self.weight}")

    def loader_config(self, data: LoaderConfig) -> LoaderConfig:
        """The class loader's config: the subject loader's, over the class images, repeating forever."""
        return dataclasses.replace(data, path=list(self.path), batch_size=self.batch_size or data.batch_size,
                                   epochs=None)


class PairedLoader:
    """Subject batches, each carrying one class batch as ``batch["prior"]``; saves and resumes both positions."""

    def __init__(self, subject: TrainLoader, prior: TrainLoader) -> None:
        self.subject, self.prior = subject, prior

    def __iter__(self) -> Iterator[dict]:
        prior = iter(self.prior)
        for batch in self.subject:
            yield dict(batch, prior=next(prior))

    def stats(self) -> dict:
        return self.subject.stats()

    def state_dict(self) -> dict:
        return {"paired": True, "subject": self.subject.state_dict(), "prior": self.prior.state_dict()}

    def resumes_exactly(self, state: dict) -> bool:
        return bool(state.get("paired")) and self.subject.resumes_exactly(state["subject"]) and \
            self.prior.resumes_exactly(state["prior"])

    def load_state_dict(self, state: dict) -> None:
        if not state.get("paired"):
            raise ValueError("this checkpoint's loader state has no class-image (prior) stream: it was written by a "
                             "run without prior preservation")
        self.subject.load_state_dict(state["subject"])
        self.prior.load_state_dict(state["prior"])

    def load_rank_states(self, states: list[dict]) -> None:
        if not all(s.get("paired") for s in states):
            raise ValueError("this checkpoint's loader states have no class-image (prior) stream")
        self.subject.load_rank_states([s["subject"] for s in states])
        self.prior.load_rank_states([s["prior"] for s in states])
