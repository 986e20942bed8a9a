"""Annotators: an image -> a control condition (edges, a soft edge map, a colour layout, grayscale, depth, pose),
and the score that says how well an image follows a condition.

One registry serves three stages: ``tessera data condition`` stores each sample's condition as
``KEY.cond.<name>.png`` (data_pipeline/condition*.py), the control-adherence metric runs the same annotator on a
generated image and compares the result with the condition it was generated from (evaluation/control.py), and
the quickstart's held-out conditions are made with it. It lives here, below data_pipeline, for that reason (as
``colour.py`` does for the colour captioner, metric and reward).

    @ANNOTATORS.register("mine")
    class Mine(Annotator):
        settings_cls = MineSettings          # a dataclass: the annotator's options, checked strictly
        metric, higher_is_better = "mine_l1", False
        def annotate(self, images): ...       # list of (H, W, 3) uint8 -> list of (H, W) or (H, W, 3) uint8
        def compare(self, generated, condition) -> dict: ...   # both already annotated

Weight-free annotators run on OpenCV (a dependency: ``cv2.Canny``, ``cv2.Sobel``, ``cv2.resize``); the model-based
ones (``depth``, ``pose``) load local transformers weights (``annotators_hf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.config import from_dict, to_dict
from tessera.registry import Registry

ANNOTATORS: Registry = Registry("annotator")


@dataclass(kw_only=True)
class AnnotatorConfig:
    """One condition's annotator: a registry ``name`` and its ``options`` (checked against its settings class)."""

    name: str  # canny | soft_edge | colour_layout | grayscale | depth | pose, or an installed plugin's
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _register_all()
        if self.name not in ANNOTATORS:
            raise ValueError(f"annotator: unknown {self.name!r} (known: {', '.join(ANNOTATORS.names())})")
        from_dict(ANNOTATORS.get(self.name).settings_cls, self.options, f"annotator {self.name} options")


def _register_all() -> None:
    """Import the model-based annotators (they register themselves; transformers loads only when one is built)."""
    from tessera.evaluation import annotators_hf  # noqa: F401


def annotator_identity(cfg: AnnotatorConfig) -> dict:
    """The identity of the annotator ``cfg`` names, without building it (no weights are loaded)."""
    _register_all()
    cls = ANNOTATORS.get(cfg.name)
    return cls.identity_of(from_dict(cls.settings_cls, cfg.options, f"annotator {cfg.name} options"))


def build_annotator(cfg: AnnotatorConfig) -> "Annotator":
    """The registered annotator for ``cfg.name`` with its settings (a model-based one loads its weights here)."""
    _register_all()
    cls = ANNOTATORS.get(cfg.name)
    return cls(from_dict(cls.settings_cls, cfg.options, f"annotator {cfg.name} options"))


class Annotator:
    """Base class: settings, identity (what the condition bytes depend on) and scoring against a condition."""

    settings_cls: type
    metric: str  # the adherence score's name, e.g. edge_f1
    higher_is_better: bool = False
    name: str = ""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @classmethod
    def identity_of(cls, settings: Any) -> dict:
        """What the conditions' bytes depend on: the annotator and its settings (a model-based one adds its weights'
        fingerprint), without loading anything; part of a condition job's fingerprint and of the manifest."""
        return {"name": cls.name, "settings": to_dict(settings)}

    def identity(self) -> dict:
        """``identity_of`` this annotator's settings."""
        return self.identity_of(self.settings)

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 RGB images -> conditions of the same H x W, uint8 (H, W) or (H, W, 3)."""
        raise NotImplementedError

    def compare(self, generated: np.ndarray, condition: np.ndarray) -> dict[str, float]:
        """Scores of an annotated generated image against the input condition; ``self.metric`` among them."""
        return {self.metric: l1(generated, condition)}

    def score(self, images: list[np.ndarray], conditions: list[np.ndarray]) -> list[dict[str, float]]:
        """Annotate ``images`` and compare each with its condition (same size, else an error naming the index)."""
        out = []
        for i, (got, cond) in enumerate(zip(self.annotate(images), conditions, strict=True)):
            cond = as_condition(cond, got.ndim == 3)
            if got.shape[:2] != cond.shape[:2]:
                raise ValueError(f"image {i}: annotated size {got.shape[:2]} differs from its condition's "
                                 f"{cond.shape[:2]}")
            out.append(self.compare(got, cond))
        return out


def as_condition(arr: np.ndarray, rgb: bool) -> np.ndarray:
    """A stored condition (read as RGB) in the annotator's layout: (H, W, 3) when ``rgb``, else one channel."""
    if rgb:
        return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    return arr if arr.ndim == 2 else arr[..., 0]


def gray(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma (ITU-R 601, as PIL's ``convert("L")``)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 maps, in [0, 1] (0: identical)."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


def edge_scores(pred: np.ndarray, target: np.ndarray, tolerance: int) -> dict[str, float]:
    """Edge precision, recall and F1 of a binary edge map against a target, an edge counting as matched within
    ``tolerance`` pixels (BSDS-style, by dilation). Both empty: F1 1 (nothing to draw, nothing drawn)."""
    import cv2

    p, t = pred > 127, target > 127
    if tolerance > 0:
        k = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
        p_near, t_near = (cv2.dilate(m.astype(np.uint8), k) > 0 for m in (p, t))
    else:
        p_near, t_near = p, t
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p == 0 and n_t == 0:
        return {"edge_f1": 1.0, "edge_precision": 1.0, "edge_recall": 1.0}
    precision = float((p & t_near).sum() / n_p) if n_p else 0.0
    recall = float((t & p_near).sum() / n_t) if n_t else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"edge_f1": f1, "edge_precision": precision, "edge_recall": recall}


# --------------------------------------------------------------------------- weight-free annotators


@dataclass(kw_only=True)
class CannySettings:
    """``cv2.Canny`` on the luma; scores match edges within ``tolerance`` pixels."""

    low: int = 100  # hysteresis thresholds on the gradient magnitude (OpenCV's defaults in its tutorials)
    high: int = 200
    blur: float = 0.0  # Gaussian sigma before Canny; 0: none (small images keep their edges)
    aperture: int = 3  # Sobel aperture: 3, 5 or 7
    l2_gradient: bool = False
    tolerance: int = 1  # pixels, for edge F1

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"need 0 <= low <= high, got {self.low}, {self.high}")
        if self.aperture not in (3, 5, 7) or self.blur < 0 or self.tolerance < 0:
            raise ValueError("aperture must be 3, 5 or 7; blur and tolerance >= 0")


@ANNOTATORS.register("canny")
class Canny(Annotator):
    """Binary edges (0 or 255) by Canny (1986); scored by edge F1 (ControlNet++'s controllability measure)."""

    settings_cls, metric, higher_is_better, name = CannySettings, "edge_f1", True, "canny"

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) -> (H, W) edge maps."""
        import cv2

        s, out = self.settings, []
        for img in images:
            g = gray(img)
            if s.blur > 0:
                g = cv2.GaussianBlur(g, (0, 0), s.blur)
            out.append(cv2.Canny(g, s.low, s.high, apertureSize=s.aperture, L2gradient=s.l2_gradient))
        return out

    def compare(self, generated: np.ndarray, condition: np.ndarray) -> dict[str, float]:
        """Edge precision/recall/F1 within the tolerance."""
        return edge_scores(generated, condition, self.settings.tolerance)


@dataclass(kw_only=True)
class SoftEdgeSettings:
    """Sobel gradient magnitude of the blurred luma, scaled so each image's strongest edge is white."""

    blur: float = 1.0  # Gaussian sigma before the gradient
    gamma: float = 0.5  # < 1 lifts faint edges, as a pencil sketch shows them

    def __post_init__(self) -> None:
        if self.blur < 0 or self.gamma <= 0:
            raise ValueError("blur must be >= 0 and gamma > 0")


@ANNOTATORS.register("soft_edge")
class SoftEdge(Annotator):
    """A soft edge (sketch) map, HED-like without weights; scored by L1 between maps."""

    settings_cls, metric, name = SoftEdgeSettings, "soft_edge_l1", "soft_edge"

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) -> (H, W) soft edge maps."""
        import cv2

        s, out = self.settings, []
        for img in images:
            g = gray(img).astype(np.float32)
            if s.blur > 0:
                g = cv2.GaussianBlur(g, (0, 0), s.blur)
            mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
            m = (mag / max(float(mag.max()), 1e-6)) ** s.gamma  # a flat image stays black
            out.append(np.clip(m * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return out


@dataclass(kw_only=True)
class ColourLayoutSettings:
    """Each ``block`` x ``block`` cell filled with its mean colour (area average, then nearest upscale)."""

    block: int = 4  # pixels per cell side

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")


@ANNOTATORS.register("colour_layout")
class ColourLayout(Annotator):
    """A colour-layout mosaic (T2I-Adapter's colour palette condition); scored by L1 between mosaics."""

    settings_cls, metric, name = ColourLayoutSettings, "layout_l1", "colour_layout"

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) -> (H, W, 3) mosaics."""
        import cv2

        b, out = self.settings.block, []
        for img in images:
            h, w = img.shape[:2]
            small = cv2.resize(np.ascontiguousarray(img), (max(1, -(-w // b)), max(1, -(-h // b))),
                               interpolation=cv2.INTER_AREA)
            out.append(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))
        return out


@dataclass(kw_only=True)
class GrayscaleSettings:
    """Luma only (no options): the condition of colourisation."""


@ANNOTATORS.register("grayscale")
class Grayscale(Annotator):
    """The image's luma, for colourisation; scored by L1 between the generated image's luma and the condition."""

    settings_cls, metric, name = GrayscaleSettings, "gray_l1", "grayscale"

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) -> (H, W) luma."""
        return [gray(img) for img in images]
