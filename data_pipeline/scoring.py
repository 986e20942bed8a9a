"""Score filters: a plug-in seam (CLIP score, aesthetics... registered by the evaluation package).

``SCORERS`` maps a name to a factory ``fn(options: dict[str, str]) -> Scorer``. A scorer scores a
batch of bucketed RGB images with their captions; the processor stores every score in
``meta["scores"][name]`` and rejects ``score_<name>`` when a score is outside [min, max].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from tessera.registry import Registry


class Scorer(Protocol):
    """A batch scorer: one float per (image, caption) pair."""

    name: str

    def score(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """One score per (image, caption) pair, in order."""
        ...


SCORERS: Registry[Callable[[dict[str, str]], Scorer]] = Registry("score filter")


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
    """Instantiate the configured scorers through the registry."""
    if any(c.name not in SCORERS for c in cfgs):
        # The model-based scorers (aesthetic, clip_score, preference) live in the evaluation package and
        # register themselves on import; imported only when a config asks for one (torch/open_clip are heavy).
        import evaluation.rewards  # noqa: F401
    return [ScoreFilter(c, SCORERS.get(c.name)(dict(c.options))) for c in cfgs]


class Colorfulness:
    """Hasler & Suesstrunk (2003) colourfulness: sigma_rgyb + 0.3 * mu_rgyb; 0 for grey images."""

    name = "colorfulness"

    def score(self, images: list[Image.Image], captions: list[str]) -> list[float]:
        """Colourfulness of each image (captions unused)."""
        out = []
        for img in images:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            rg, yb = r - g, 0.5 * (r + g) - b
            sigma = np.hypot(rg.std(), yb.std())
            mu = np.hypot(rg.mean(), yb.mean())
            out.append(float(sigma + 0.3 * mu))
        return out


@SCORERS.register("colorfulness")
def _colorfulness(options: dict[str, str]) -> Scorer:
    if options:
        raise ValueError(f"score filter 'colorfulness' takes no options, got {sorted(options)}")
    return Colorfulness()
