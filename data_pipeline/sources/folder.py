"""``folder`` source: images with sidecar captions (``x.jpg`` + ``x.txt`` and/or ``x.json``) or one
captions CSV (columns ``file,caption``; ``file`` relative to the folder). Local or s3://.

The listing is recursive and sorted, and partitions are consecutive ranges of it, so the split is
the same on every run. A ``.json`` sidecar's ``caption`` is used when there is no ``.txt``; its
``captions`` mapping becomes caption variants and its other fields go to meta.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Iterator

from tessera.data_pipeline.sample import RawSample
from tessera.data_pipeline.sources import SOURCES, Partition, SourceConfig
from tessera import storage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _rel(url: str, root: str) -> str:
    return posixpath.relpath(url, root.rstrip("/")) if storage.is_s3(root) else os.path.relpath(url, root)


class FolderSource:
    """Image files under a directory, captioned by sidecars or a captions CSV."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg, self.captions_csv = cfg, cfg.section().captions_csv
        self._csv: dict[str, str] | None = None

    def listing(self) -> list[list]:
        """Sorted [image_rel, txt_rel | None, json_rel | None] for every image under the root."""
        root = self.cfg.path
        rels = [_rel(u, root) for u in storage.list_prefix(root)]
        if not rels:
            raise FileNotFoundError(f"no files under {root}")
        present = set(rels)
        out = []
        for rel in rels:
            stem, ext = os.path.splitext(rel)
            if ext.lower() in IMAGE_EXTS:
                txt, js = stem + ".txt", stem + ".json"
                out.append([rel, txt if txt in present else None, js if js in present else None])
        return out[: self.cfg.limit] if self.cfg.limit is not None else out

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """Consecutive ranges of the sorted listing; each payload carries its file names."""
        if samples_per_partition < 1:
            raise ValueError(f"samples_per_partition must be >= 1, got {samples_per_partition}")
        items = self.listing()
        return [
            Partition("folder", i, {"files": items[s : s + samples_per_partition]})
            for i, s in enumerate(range(0, len(items), samples_per_partition))
        ]

    def _captions_csv(self) -> dict[str, str]:
        if self._csv is None:
            text = storage.read_text(self.captions_csv)  # type: ignore[arg-type]
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{self.captions_csv}: needs columns 'file' and 'caption'")
            self._csv = {row["file"]: row["caption"] for row in reader}
        return self._csv

    def read(self, part: Partition) -> Iterator[RawSample]:
        """Read each listed image with its caption; unreadable files become read_error samples."""
        for rel, txt, js in part.payload["files"]:
            url = storage.join(self.cfg.path, rel)
            sid = f"folder:{rel}"
            meta: dict = {"path": url}
            try:
                data = storage.read_bytes(url)
                caption: bytes | str | None = None
                if self.captions_csv:
                    caption = self._captions_csv().get(rel)
                if js is not None:
                    fields = json.loads(storage.read_bytes(storage.join(self.cfg.path, js)))
                    if not isinstance(fields, dict):
                        raise ValueError(f"{js}: sidecar JSON is not an object")
                    caption = caption if caption is not None else fields.pop("caption", None)
                    fields.pop("caption", None)
                    meta.update({k: v for k, v in fields.items() if k not in ("path", "url")})
                if txt is not None and not self.captions_csv:
                    caption = storage.read_bytes(storage.join(self.cfg.path, txt))  # bytes: decoded later
            except (OSError, ValueError) as e:
                yield RawSample("folder", sid, None, None, meta, "read_error", f"{type(e).__name__}: {e}")
                continue
            yield RawSample("folder", sid, data, caption, meta)


@SOURCES.register("folder")
def _build(cfg: SourceConfig) -> FolderSource:
    return FolderSource(cfg)
