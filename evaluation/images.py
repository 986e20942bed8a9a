"""Image sources for metrics: a folder, a list of PIL images, tar files, or a Tessera dataset's shards.

A source is iterable (PIL images, in a deterministic order) and has an ``identity()``: a JSON-able
description that changes whenever the images could have changed. It keys the statistics cache.
Shard members are only ever decoded as images; nothing is unpickled. Images that fail to decode are
counted in ``source.failures`` (by reason) and reported by the metric, never dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Protocol

from PIL import Image

from tessera.tars import read_samples

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _is_image(ext: str) -> bool:
    """A webdataset extension naming an image (``jpg``, not ``seg.png``: that is another field)."""
    return f".{ext.lower()}" in IMAGE_EXTS


class ImageSource(Protocol):
    """What the metrics read: images in a fixed order plus an identity for caching."""

    failures: Counter

    def __iter__(self) -> Iterator[Image.Image]: ...

    def identity(self) -> dict: ...


def _decode(data: bytes, name: str, failures: Counter) -> Image.Image | None:
    """Decode image bytes fully (so errors surface here); count a failure instead of raising."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as e:  # PIL raises many types for corrupt files
        failures[f"decode_error:{type(e).__name__}"] += 1
        return None


class FolderSource:
    """Image files under a folder (recursive), in sorted relative-path order."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not self.files:
            raise ValueError(f"{self.root}: no image files ({', '.join(IMAGE_EXTS)})")
        self.failures: Counter = Counter()

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Image.Image]:
        for p in self.files:
            img = _decode(p.read_bytes(), str(p), self.failures)
            if img is not None:
                yield img

    def identity(self) -> dict:
        """Sorted file list with sizes and mtimes, hashed."""
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"kind": "folder", "root": str(self.root.resolve()), "n_files": len(self.files),
                "files_sha256": h.hexdigest()}


class PILSource:
    """An in-memory list of PIL images; identity hashes the pixels."""

    def __init__(self, images: list[Image.Image]) -> None:
        if not images:
            raise ValueError("empty image list")
        self.images = list(images)
        self.failures: Counter = Counter()

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def identity(self) -> dict:
        """sha256 over mode, size and pixel bytes of every image."""
        h = hashlib.sha256()
        for img in self.images:
            h.update(f"{img.mode}\0{img.size}\n".encode())
            h.update(img.tobytes())
        return {"kind": "pil", "n": len(self.images), "pixels_sha256": h.hexdigest()}


class TarSource:
    """Image members of webdataset tars (local paths or s3:// urls), streamed by :mod:`tessera.tars`."""

    def __init__(self, urls: list[str], *, identity: dict | None = None) -> None:
        if not urls:
            raise ValueError("no tar files given")
        self.urls = [str(u) for u in urls]
        self._identity = identity
        self.failures: Counter = Counter()

    def __iter__(self) -> Iterator[Image.Image]:
        for url in self.urls:
            # Members outside any sample are counted in failures; a damaged tar raises, naming it.
            for sample in read_samples(url, keep=_is_image, skipped=self.failures):
                for ext, data in sample.members.items():
                    img = _decode(data, f"{url}:{sample.key}.{ext}", self.failures)
                    if img is not None:
                        yield img

    def identity(self) -> dict:
        """Given identity (a manifest hash), else tar names with sizes and mtimes (local files)."""
        if self._identity is not None:
            return self._identity
        from tessera import storage

        h = hashlib.sha256()
        for url in self.urls:
            if storage.is_s3(url):  # no cheap, trustworthy change marker without a manifest
                raise ValueError(f"{url}: remote tars need a dataset manifest to be cached; "
                                 "pass the dataset directory instead")
            st = os.stat(url)
            h.update(f"{Path(url).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"kind": "tar", "n_tars": len(self.urls), "tars_sha256": h.hexdigest()}


def shard_source(dataset: str) -> TarSource:
    """A Tessera dataset (``tessera-shards/1`` manifest): its shards, keyed by the manifest's sha256."""
    from tessera import storage

    manifest_url = storage.join(dataset, "manifest.json")
    raw = storage.read_bytes(manifest_url)
    manifest = json.loads(raw)
    if manifest.get("format") != "tessera-shards/1":
        raise ValueError(f"{manifest_url}: unknown dataset format {manifest.get('format')!r}")
    urls = [storage.join(dataset, s["name"]) for s in manifest.get("shards", [])]
    if not urls:
        raise ValueError(f"{manifest_url}: dataset has no shards")
    ident = {"kind": "tessera-shards", "dataset": str(dataset),
             "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    return TarSource(urls, identity=ident)


def as_source(obj) -> ImageSource:
    """Coerce a folder path, a dataset dir/url (has manifest.json), a .tar path or a PIL list to a source."""
    if isinstance(obj, (FolderSource, PILSource, TarSource)):
        return obj
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(o, Image.Image) for o in obj):
            return PILSource(list(obj))
        if obj and all(str(o).endswith(".tar") for o in obj):
            return TarSource([str(o) for o in obj])
        raise TypeError("a list source must hold PIL images or .tar paths")
    if isinstance(obj, (str, Path)):
        from tessera import storage

        s = str(obj)
        if s.endswith(".tar"):
            return TarSource([s])
        if storage.is_s3(s) or (Path(s) / "manifest.json").is_file():
            return shard_source(s)
        return FolderSource(s)
    raise TypeError(f"cannot read images from {type(obj).__name__}")
