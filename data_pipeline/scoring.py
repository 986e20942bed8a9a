"""Score filters: ingest keeps a sample only when a reward's score is inside a configured range.

The scorers are the evaluation package's rewards (``evaluation.rewards.REWARDS``: colorfulness, CLIP score,
aesthetics, preference), built from the filter's ``options: dict[str, str]``. A scorer scores a batch of
bucketed RGB images with their captions; the processor stores every score in ``meta["scores"][name]`` and
rejects ``score_<name>`` when a score is outside [min, max].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image


class Scorer(Protocol):
    """A batch scorer: one float per (image, caption) pair."""

    name: str

    def score(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """One score per (image, caption) pair, in order."""
        ...


@dataclass(kw_only=True)
class ScoreFilterConfig:
    """One score filter: the registry name, the kept range (None = unbounded) and scorer options."""

    name: str
    min: float | None = None
    max: float | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"score filter {self.name!r}: min {self.min} > max {self.max}")


@dataclass
class ScoreFilter:
    """A built scorer with the range it enforces."""

    cfg: ScoreFilterConfig
    scorer: Scorer

    def keeps(self, value: float) -> bool:
        """True if ``value`` is inside [min, max] (NaN is never kept)."""
        if value != value:  # NaN
            return False
        lo, hi = self.cfg.min, self.cfg.max
        return (lo is None or value >= lo) and (hi is None or value <= hi)


def build_score_filters(cfgs: list[ScoreFilterConfig]) -> list[ScoreFilter]:
    """Instantiate the configured scorers from the reward registry."""
    if not cfgs:
        return []
    # Imported here, not at the top: the rewards pull in torch and open_clip, which an ingest without
    # score filters never needs (its workers then start ~3 s faster).
    from tessera.evaluation.rewards import build_reward

    return [ScoreFilter(c, build_reward(c.name, dict(c.options))) for c in cfgs]
