"""``webdataset`` source: existing tars (local or s3://), to reshard, refilter or rebucket.

Tars are streamed by :mod:`tessera.tars`, which groups members by webdataset's own key rule. We read them
with it rather than with ``webdataset.WebDataset``: the grouping is the same, but tessera.tars streams
through :mod:`tessera.storage` (our S3 client, credentials and retries) without importing torch, and it
catches truncated tars that Python's tarfile (which webdataset uses) would end early without a word; such a
tar becomes one counted ``read_error`` here. Only image bytes, ``.txt`` and ``.json`` (parsed with ``json``)
are kept; every other member (pickles, tensors, caches) is dropped unread, so no shard member is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Iterator

from tessera.data_pipeline.sample import RawSample
from tessera.data_pipeline.sources import SOURCES, Partition, SourceConfig
from tessera import storage
from tessera.tars import TarReadError, read_samples

log = logging.getLogger("tessera.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# KEY.json fields of a tessera shard that describe the old encoding, not the sample: dropped on input.
_PROVENANCE = ("source_id", "url", "path", "source")
_DERIVED = {"key", "bucket", "sha256", "phash", "orig_size", "scores", "caption", "captions", "meta"}


def _wanted(ext: str) -> bool:
    return ext.lower() in IMAGE_EXTS or ext.lower() in ("txt", "json")


class WebdatasetSource:
    """Samples of existing webdataset tars; one partition per tar."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg

    def tars(self) -> list[str]:
        """Sorted tar urls: the path itself or every .tar under it."""
        path = self.cfg.path
        if path.endswith(".tar"):
            return [path]
        found = [u for u in storage.list_prefix(path) if u.endswith(".tar")]
        if not found:
            raise FileNotFoundError(f"no .tar files at {path}")
        return found

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """One partition per tar (tars are the natural, unsized unit); samples_per_partition unused."""
        tars = self.tars()
        root = self.cfg.path
        rels = [os.path.basename(t) if len(tars) == 1 else t[len(root.rstrip("/")) + 1 :] for t in tars]
        return [Partition("webdataset", i, {"tar": t, "rel": r}) for i, (t, r) in enumerate(zip(tars, rels))]

    def read(self, part: Partition) -> Iterator[RawSample]:
        """Stream the tar; yield one RawSample per key (a tar read failure is one counted sample)."""
        url, rel = part.payload["tar"], part.payload["rel"]
        strays: Counter = Counter()  # members outside any sample (README, __meta__ entries): logged, not inputs
        try:
            for s in read_samples(url, keep=_wanted, skipped=strays):  # webdataset lower-cases extensions too
                yield self._sample(url, rel, s.key, {ext.lower(): data for ext, data in s.members.items()})
        except (OSError, TarReadError) as e:  # the sample being read when it failed is part of this one
            yield RawSample("webdataset", f"webdataset:{rel}:#read_error", None, None, {"path": url},
                            "read_error", f"{type(e).__name__}: {e}")  # fmt: skip
        if strays:
            log.warning("webdataset %s: skipped %d member(s) outside any sample: %s", url, sum(strays.values()),
                        dict(strays))

    @staticmethod
    def _sample(url: str, rel: str, key: str, members: dict[str, bytes]) -> RawSample:
        sid = f"webdataset:{rel}:{key}"
        meta: dict = {"path": f"{url}#{key}"}
        fields: dict = {}
        if "json" in members:
            try:
                fields = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return RawSample("webdataset", sid, None, None, meta, "bad_json", str(e))
            if not isinstance(fields, dict):
                return RawSample("webdataset", sid, None, None, meta, "bad_json", "not an object")
        if isinstance(fields.get("meta"), dict):
            meta.update(fields["meta"])
        for k, v in fields.items():
            if k in _PROVENANCE:  # keep the lineage without claiming the old location as ours
                meta[f"orig_{k}"] = v
            elif k not in _DERIVED:
                meta[k] = v
        variants = fields.get("captions")
        if isinstance(variants, dict):
            meta["captions"] = {k: v for k, v in variants.items() if isinstance(v, str)}
        caption = members.get("txt")
        if caption is None:
            caption = fields.get("caption")
        if caption is None and isinstance(variants, dict):
            caption = variants.get("alt")
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            detail = f"members: {sorted(members)}"
            return RawSample("webdataset", sid, None, caption, meta, "no_image", detail)
        return RawSample("webdataset", sid, image, caption, meta)


@SOURCES.register("webdataset")
def _build(cfg: SourceConfig) -> WebdatasetSource:
    return WebdatasetSource(cfg)
