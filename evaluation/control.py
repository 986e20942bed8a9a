"""Control adherence: how well generated images follow the condition they were generated from.

The suite's control set is held-out samples of a conditioned dataset (``tessera data condition``): each gives a
prompt (its caption), a condition (``KEY.cond.<name>.png``) and the real image. Every generated image is run
through the same annotator that made the condition (the manifest names it and its settings) and compared with the
input condition: edge F1 for Canny (ControlNet++'s controllability measure), L1 for a colour layout, soft edges,
grayscale, depth or pose. Two reference points are reported beside it, with the same prompts, conditions and seeds:

* the **ceiling**: the real images of the control set, annotated and compared with their own conditions;
* the **floor**: the same checkpoint sampled with ``control_scale = 0``, i.e. its base model without control.

A control branch that works lands between them, well above the floor.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tessera import storage
from tessera.config import ConfigError, from_dict
from tessera.evaluation.annotators import AnnotatorConfig, build_annotator
from tessera.tars import read_samples

CAPTION_MEMBERS = ("txt",)


@dataclass
class ControlSet:
    """Held-out (prompt, condition, real image) triples and the annotator that made the conditions."""

    keys: list[str]
    prompts: list[str]
    conditions: list[Image.Image]
    reals: list[Image.Image]
    annotator: AnnotatorConfig
    condition: str
    manifest_sha256: str


def _caption(key: str, members: dict[str, bytes]) -> str:
    """The sample's caption: ``KEY.txt``, else the first of ``KEY.json``'s captions."""
    if "txt" in members:
        return members["txt"].decode("utf-8").strip()
    caps = json.loads(members.get("json", b"{}")).get("captions") or {}
    if not caps:
        raise ValueError(f"control set: sample {key} has no caption (KEY.txt or captions in KEY.json)")
    return str(next(iter(caps.values())))


def _image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


def load_control_set(dataset: str, condition: str | None, n: int) -> ControlSet:
    """The first ``n`` samples of ``dataset`` (manifest order) that carry the condition; samples without it are
    skipped and counted in the error if too few remain."""
    import hashlib

    raw = storage.read_bytes(storage.join(dataset, "manifest.json"))
    manifest = json.loads(raw)
    conds = manifest.get("conditions") or {}
    if not conds:
        raise ConfigError(f"control.dataset {dataset}: its manifest lists no conditions (make them with "
                          "`tessera data condition`)")
    name = condition or (next(iter(conds)) if len(conds) == 1 else None)
    if name not in conds:
        raise ConfigError(f"control.condition {condition!r}: {dataset} has {sorted(conds)}; name one")
    member = conds[name]["member"]
    ann = from_dict(AnnotatorConfig, {"name": conds[name]["annotator"]["name"],
                                      "options": conds[name]["annotator"]["settings"]}, f"{dataset} manifest")
    keys, prompts, cond_imgs, reals, missing = [], [], [], [], 0
    for shard in manifest["shards"]:
        for s in read_samples(storage.join(dataset, shard["name"])):
            img_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in s.members), None)
            if member not in s.members or img_ext is None:
                missing += 1
                continue
            keys.append(s.key)
            prompts.append(_caption(s.key, s.members))
            cond_imgs.append(_image(s.members[member]))
            reals.append(_image(s.members[img_ext]))
            if len(keys) == n:
                break
        if len(keys) == n:
            break
    if len(keys) < n:
        raise ValueError(f"control set: {dataset} has {len(keys)} samples with {member} and an image "
                         f"({missing} without), the suite asks for {n}")
    return ControlSet(keys, prompts, cond_imgs, reals, ann, name, hashlib.sha256(raw).hexdigest())


class ControlScorer:
    """The control set's annotator, scoring images against the set's conditions."""

    def __init__(self, cset: ControlSet) -> None:
        self.set = cset
        self.annotator = build_annotator(cset.annotator)
        self.metric = self.annotator.metric
        self.higher_is_better = self.annotator.higher_is_better

    def scores(self, images: list[Image.Image], prompt_idx: list[int]) -> list[dict[str, float]]:
        """Per image: the annotator's scores against the condition of its prompt (resized to the image's size)."""
        conds = []
        for img, p in zip(images, prompt_idx, strict=True):
            c = self.set.conditions[p]
            conds.append(np.asarray(c if c.size == img.size else c.resize(img.size, Image.NEAREST)))
        return self.annotator.score([np.asarray(img.convert("RGB")) for img in images], conds)

    def mean(self, images: list[Image.Image], prompt_idx: list[int]) -> float:
        """The mean adherence metric of ``images``."""
        return float(np.mean([s[self.metric] for s in self.scores(images, prompt_idx)]))

    def ceiling(self) -> float:
        """The metric of the real images against their own conditions."""
        return self.mean(self.set.reals, list(range(len(self.set.reals))))


def write_control_images(cset: ControlSet, out: str) -> None:
    """The set's conditions and real images as ``<out>/control/{condition,real}/PPPPP.png`` (for the report)."""
    for kind, imgs in (("condition", cset.conditions), ("real", cset.reals)):
        for i, img in enumerate(imgs):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            storage.write_bytes(storage.join(out, "control", kind, f"{i:05d}.png"), buf.getvalue())


def read_control_image(out: str, kind: str, i: int) -> Image.Image:
    """One image written by ``write_control_images``."""
    return _image(storage.read_bytes(storage.join(out, "control", kind, f"{i:05d}.png")))
