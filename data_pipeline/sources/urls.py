"""``urls`` source: img2dataset-style tables (parquet / csv / jsonl) of url + caption (+ extra columns).

Partitions are row ranges of each table file (in sorted file order), so they are cheap to list and
identical on every run. Each partition downloads its rows with a bounded thread pool and yields them
in row order.
"""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Iterator

import pyarrow as pa

from tessera.data_pipeline.sample import RawSample
from tessera.data_pipeline.sources import SOURCES, Partition, SourceConfig
from tessera.data_pipeline.sources.http import Downloader
from tessera import storage

_EXT_FORMAT = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def table_format(url: str, configured: str) -> str:
    """The table format of a file: configured, or from its extension."""
    if configured != "auto":
        return configured
    ext = os.path.splitext(url.lower())[1]
    if ext not in _EXT_FORMAT:
        raise ValueError(f"{url}: cannot tell the table format from '{ext}'; set source.format")
    return _EXT_FORMAT[ext]


def load_rows(url: str, fmt: str, url_col: str, caption_col: str) -> list[dict | None]:
    """All rows of a table file as dicts (None for an unparseable JSONL line, counted later)."""
    raw = storage.read_bytes(url)
    if fmt == "jsonl":
        rows: list[dict | None] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            rows.append(row if isinstance(row, dict) else None)
        return rows
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw))
    else:
        import pyarrow.csv as pcsv

        # Keep url/caption as text even when they look numeric; other columns are inferred.
        types = {url_col: pa.string(), caption_col: pa.string()}
        table = pcsv.read_csv(io.BytesIO(raw), convert_options=pcsv.ConvertOptions(column_types=types))
    for col in (url_col, caption_col):
        if col not in table.column_names:
            raise ValueError(f"{url}: no column '{col}' (columns: {', '.join(table.column_names)})")
    return table.to_pylist()


class UrlsSource:
    """Rows of url tables, downloaded over HTTP (or read from local paths / s3:// urls)."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.downloader = Downloader(cfg)
        self._cache: tuple[str, list] | None = None  # the last table read: partitions share files
        self._lock = threading.Lock()

    def files(self) -> list[str]:
        """The table files, sorted: the path itself, or the tables under it."""
        path = self.cfg.path
        if storage.is_s3(path) and storage.exists(path) or not storage.is_s3(path) and os.path.isfile(path):
            return [path]
        found = [u for u in storage.list_prefix(path) if os.path.splitext(u.lower())[1] in _EXT_FORMAT]
        if not found:
            raise FileNotFoundError(f"no .parquet/.csv/.jsonl tables at {path}")
        return found

    def _rows(self, url: str) -> list:
        with self._lock:
            if self._cache is None or self._cache[0] != url:
                fmt = table_format(url, self.cfg.format)
                self._cache = (url, load_rows(url, fmt, self.cfg.url_col, self.cfg.caption_col))
            return self._cache[1]

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """Row ranges of each file, in file order, truncated to ``limit`` rows in total."""
        if samples_per_partition < 1:
            raise ValueError(f"samples_per_partition must be >= 1, got {samples_per_partition}")
        parts, remaining = [], self.cfg.limit
        files = self.files()
        for url in files:
            n = len(self._rows(url))
            if remaining is not None:
                n, remaining = min(n, remaining), remaining - min(n, remaining)
            rel = os.path.basename(url) if len(files) == 1 else os.path.relpath(url, self.cfg.path)
            for start in range(0, n, samples_per_partition):
                end = min(start + samples_per_partition, n)
                payload = {"file": url, "rel": rel, "start": start, "end": end}
                parts.append(Partition("urls", len(parts), payload))
        return parts

    def read(self, part: Partition) -> Iterator[RawSample]:
        """Download the partition's rows concurrently; yield them in row order."""
        p = part.payload
        rows = self._rows(p["file"])[p["start"] : p["end"]]
        items = [(p["start"] + i, row) for i, row in enumerate(rows)]
        todo = [(i, row) for i, row in items if self._url(row)]
        fetched = iter(self.downloader.map_ordered(todo, lambda it: self._url(it[1])))
        for index, row in items:
            sid = f"urls:{p['rel']}:{index}"
            if row is None:
                yield RawSample("urls", sid, None, None, {}, "bad_row", "not a JSON object")
                continue
            url = self._url(row)
            meta = {"url": url, **self._extra(row)}
            if not url:
                yield RawSample("urls", sid, None, None, meta, error="missing_url")
                continue
            _, res = next(fetched)
            yield RawSample("urls", sid, res.data, row.get(self.cfg.caption_col), meta, res.error, res.detail)

    def _url(self, row: dict | None) -> str:
        value = None if row is None else row.get(self.cfg.url_col)
        return value.strip() if isinstance(value, str) else ""

    def _extra(self, row: dict) -> dict:
        skip = {self.cfg.url_col, self.cfg.caption_col}
        keep = self.cfg.extra_cols
        return {k: v for k, v in row.items() if k not in skip and (keep is None or k in keep)}


@SOURCES.register("urls")
def _build(cfg: SourceConfig) -> UrlsSource:
    return UrlsSource(cfg)
