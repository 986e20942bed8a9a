"""Model-based annotators: depth (``AutoModelForDepthEstimation``: DPT, Depth Anything, ...) and pose (ViTPose), from
local transformers weights only.

Like every model Tessera loads, the weights are a local folder (``from_pretrained(path)`` with
``trust_remote_code`` off unless the options opt in), named in a condition job's fingerprint by the fingerprint of
their files. Nothing is downloaded: with ``HF_HUB_OFFLINE=1`` a missing folder is an error naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tessera.evaluation.annotators import ANNOTATORS, Annotator

# COCO-17 limbs (ViTPose's keypoint order), drawn as the pose condition.
COCO_LIMBS = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
              (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


@dataclass(kw_only=True)
class ModelSettings:
    """A local transformers model folder and how to run it."""

    path: str  # a local folder written by save_pretrained (weights + image processor config)
    device: str = "auto"  # auto: the local GPU, else the CPU
    batch_size: int = 16
    trust_remote_code: bool = False  # only a config may opt in to running a model repository's code

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name a local model folder")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class PoseSettings(ModelSettings):
    """ViTPose on the whole image as one person box; keypoints under ``threshold`` are not drawn."""

    threshold: float = 0.3
    thickness: int = 1  # limb width in pixels


class _ModelAnnotator(Annotator):
    """Loads the processor and model once per process; identity names the weights by their files' fingerprint."""

    def __init__(self, settings: ModelSettings) -> None:
        import transformers

        from tessera.device import pick_device

        super().__init__(settings)
        if not Path(settings.path).is_dir():
            raise FileNotFoundError(f"annotator {self.name}: no model folder at {settings.path} (the weights must be "
                                    "local: save_pretrained a model and its image processor there)")
        self.device = pick_device(settings.device)
        self.processor = transformers.AutoImageProcessor.from_pretrained(
            settings.path, trust_remote_code=settings.trust_remote_code)
        self.model = self.load(transformers).to(self.device).eval()

    def load(self, transformers):
        """The model, from the local folder."""
        raise NotImplementedError

    @classmethod
    def identity_of(cls, settings: ModelSettings) -> dict:
        """Settings plus the weights' fingerprint (a changed file changes the job fingerprint)."""
        from tessera.trainer.text_encoders.runtime import weights_fingerprint

        fp = hashlib.sha256(weights_fingerprint(settings.path).encode()).hexdigest()[:16]
        return dict(super().identity_of(settings), weights=f"sha256:{fp}")

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Batches of ``batch_size`` through the model."""
        import torch

        out: list[np.ndarray] = []
        bs = self.settings.batch_size
        with torch.no_grad():
            for i in range(0, len(images), bs):
                out += self.run(images[i:i + bs])
        return out

    def run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One batch of images -> conditions."""
        raise NotImplementedError


@ANNOTATORS.register("depth")
class Depth(_ModelAnnotator):
    """Relative depth (any ``AutoModelForDepthEstimation``), min-max normalised per image; scored by L1."""

    settings_cls, metric, name = ModelSettings, "depth_l1", "depth"

    def load(self, transformers):
        """``AutoModelForDepthEstimation.from_pretrained(path)``."""
        return transformers.AutoModelForDepthEstimation.from_pretrained(
            self.settings.path, trust_remote_code=self.settings.trust_remote_code)

    def run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Predicted depth resized (bicubic) to each image's size, scaled to 0..255."""
        import torch.nn.functional as F

        out = []
        for img in images:  # one at a time: images of a batch may differ in size (buckets)
            inputs = self.processor(images=[img], return_tensors="pt").to(self.device)
            d = self.model(**inputs).predicted_depth[:, None].float()  # (1, 1, h, w)
            d = F.interpolate(d, size=img.shape[:2], mode="bicubic", align_corners=False)[0, 0].cpu().numpy()
            lo, hi = float(d.min()), float(d.max())
            out.append(np.zeros(img.shape[:2], np.uint8) if hi - lo < 1e-8 else
                       np.clip((d - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return out


@ANNOTATORS.register("pose")
class Pose(_ModelAnnotator):
    """COCO keypoints by ViTPose (``VitPoseForPoseEstimation``), drawn as limbs on black; scored by L1 between the
    drawings (a coarse measure: it does not match keypoints)."""

    settings_cls, metric, name = PoseSettings, "pose_l1", "pose"

    def load(self, transformers):
        """``VitPoseForPoseEstimation.from_pretrained(path)`` (no Auto class covers it)."""
        return transformers.VitPoseForPoseEstimation.from_pretrained(
            self.settings.path, trust_remote_code=self.settings.trust_remote_code)

    def run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Keypoints of the whole-image box, drawn with OpenCV."""
        import cv2

        boxes = [[[0, 0, img.shape[1], img.shape[0]]] for img in images]  # (x, y, w, h) per image
        inputs = self.processor(images=images, boxes=boxes, return_tensors="pt").to(self.device)
        found = self.processor.post_process_pose_estimation(self.model(**inputs), boxes=boxes)
        out = []
        for img, people in zip(images, found):
            canvas = np.zeros(img.shape[:2], np.uint8)
            for person in people:
                kp, ok = person["keypoints"].cpu().numpy(), (person["scores"] >= self.settings.threshold).cpu().numpy()
                for a, b in COCO_LIMBS:
                    if a < len(kp) and b < len(kp) and ok[a] and ok[b]:
                        cv2.line(canvas, tuple(int(v) for v in kp[a]), tuple(int(v) for v in kp[b]), 255,
                                 self.settings.thickness)
            out.append(canvas)
        return out
