"""The labelled digits task shared by the recipe test and ``bench/preference.py --task digits``: scikit-learn's
1,797 handwritten digits captioned "a handwritten digit {d}", a three-way key split, and the independent judge.

* ``split_of`` puts every image in one of three disjoint parts by a hash of its key: ``reward`` (40%) trains the
  reward classifier (``tessera train-classifier``'s SmallCNN), ``judge`` (40%) the judge, ``test`` (20%) measures
  both on real images neither saw.
* ``Judge`` is another model family on other images: an RBF support-vector machine (scikit-learn's SVC) on the 8x8
  grey image, the resolution the digits were drawn at. It shares no weights, architecture or training image with
  the reward, so it is an independent score of "does this image show the prompted digit". It is refitted on each
  load (well under a second), so no fitted model is ever unpickled.
* ``write_digits`` writes the images at any size as a Tessera dataset (``tessera-shards/1``), with the label in
  each sample's metadata, for the tests' tiny bases.
"""

from __future__ import annotations

import hashlib

import numpy as np

PROMPT = "a handwritten digit {label}"
LABELS = [str(d) for d in range(10)]
SPLITS = (("reward", 0.4), ("judge", 0.4), ("test", 0.2))


def split_of(key: str) -> str:
    """The part of the three-way key-hash split a sample belongs to (stable across runs and machines)."""
    u = int.from_bytes(hashlib.sha256(f"labelled-task:{key}".encode()).digest()[:8], "little") / 2**64
    acc = 0.0
    for name, share in SPLITS:
        acc += share
        if u < acc:
            return name
    return SPLITS[-1][0]


def digit_images(size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, images (N, size, size, 3) uint8, labels (N,)): the 1,797 digits as black ink on white, bicubic."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = (255 - d.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # 0 = paper, 16 = full ink
    images = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC).convert("RGB"))
                       for g in grey])
    return [f"{i:05d}" for i in range(len(grey))], images, d.target.astype(int)


def write_digits(root, size: int = 16, part: str | None = None) -> int:
    """The digits (or one split ``part``) as a Tessera dataset at ``size`` px; returns the sample count."""
    from PIL import Image

    from tests.finetune.shapes import write_samples

    keys, images, labels = digit_images(size)
    items = [(k, Image.fromarray(im), PROMPT.format(label=int(y)), {"label": str(int(y))})
             for k, im, y in zip(keys, images, labels) if part is None or split_of(k) == part]
    write_samples(root, items, size)
    return len(items)


class Judge:
    """The independent classifier: an RBF SVM on the 8x8 grey image (block means of the image, 1 = ink)."""

    def __init__(self, images, labels) -> None:
        from sklearn.svm import SVC

        self.model = SVC(C=10.0, gamma="scale").fit(self.features(images), np.asarray(labels))

    @classmethod
    def for_part(cls, size: int = 32, part: str = "judge") -> Judge:
        """The judge fitted on its own split of the digits."""
        keys, images, labels = digit_images(size)
        mine = [i for i, k in enumerate(keys) if split_of(k) == part]
        return cls(images[mine], labels[mine])

    @staticmethod
    def features(images) -> np.ndarray:
        """(N, 64) in [0, 1] from (N, H, W, 3) uint8 arrays or (N, 3, H, W) arrays/tensors in [-1, 1]."""
        x = np.asarray(images, np.float64)
        if x.shape[1] == 3:  # (N, 3, H, W) in [-1, 1]
            x = (x.transpose(0, 2, 3, 1) + 1) * 127.5
        grey = 1.0 - x.mean(-1) / 255.0  # (N, H, W), ink = 1
        n, h, w = grey.shape
        return grey.reshape(n, 8, h // 8, 8, w // 8).mean((2, 4)).reshape(n, 64)

    def predict(self, images) -> np.ndarray:
        """The predicted digit of each image."""
        return self.model.predict(self.features(images))

    def accuracy(self, images, labels) -> float:
        """Share of images judged to show their label."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))
