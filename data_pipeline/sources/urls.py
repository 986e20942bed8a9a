"""``urls`` source: img2dataset-style url tables, each partition reading only its rows and the columns it needs.

Formats, as img2dataset's ``input_format``: ``parquet``; ``arrow`` (an Arrow IPC file, ``.arrow``/``.feather``);
``csv`` and ``tsv`` with a header; ``txt`` (one url per line); ``json`` (one JSON array of objects -- not JSON
lines); ``jsonl`` (one object per line); the text formats also gzipped (``.csv.gz`` ...).

Partitions are row ranges of each table file (in sorted file order): cheap to list, identical on every run. The
driver counts rows without loading a table: parquet from its footer, arrow from its batches' metadata, text formats
in one streaming pass. A partition reads parquet by row groups and columns (``iter_batches`` over the row groups
that overlap its range), arrow by record batches, and text formats as a stream of 1 MiB blocks up to its range,
so its memory holds its own rows only. Each partition downloads its rows with a bounded thread pool and yields them
in row order; a row that is not an object (JSON formats) is a counted ``bad_row``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from tessera import storage
from tessera.data_pipeline.sample import RawSample
from tessera.data_pipeline.sources import SOURCES, Partition, SourceConfig, UrlsSourceConfig
from tessera.data_pipeline.sources.http import Downloader

_EXT_FORMAT = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".csv": "csv", ".tsv": "tsv",
               ".txt": "txt", ".json": "json", ".jsonl": "jsonl"}
_BLOCK = 1 << 20
_BATCH_ROWS = 8192


def table_format(url: str, configured: str) -> str:
    """The table format of a file: configured, or from its extension (``.gz`` for the text formats)."""
    if configured != "auto":
        return configured
    name = url.lower()
    gz = name.endswith(".gz")
    fmt = _EXT_FORMAT.get(os.path.splitext(name[:-3] if gz else name)[1])
    if fmt is None or gz and fmt in ("parquet", "arrow"):
        raise ValueError(f"{url}: cannot tell the table format from its name; set source.format")
    return fmt + (".gz" if gz else "")


class _S3File(io.RawIOBase):
    """A seekable read-only S3 object: each read is one ranged GET (pyarrow reads parquet footers and column
    chunks by seeking, so a partition fetches only the bytes of its row groups and columns)."""

    def __init__(self, url: str) -> None:
        from tessera.storage.s3_client import call, split_url

        bucket, key = split_url(url)
        self.url, self.pos = url, 0
        self.size = int(call(url, "head_object", Bucket=bucket, Key=key)["ContentLength"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, self.size)[whence] + pos)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n:
            storage.read_ranges(self.url, [(self.pos, [memoryview(b)[:n]])])
            self.pos += n
        return n


def _random_access(url: str) -> Any:
    """What pyarrow opens for random access: a local path, or a seekable S3 object."""
    if storage.is_s3(url):
        # pyarrow reads footers and column chunks in exact sizes; the small buffer only joins its tiny reads.
        return pa.PythonFile(io.BufferedReader(_S3File(url), buffer_size=64 << 10), mode="r")
    return str(storage.local_path(url))


def _stream(url: str, gz: bool) -> BinaryIO:
    f = storage.open_read(url)
    return gzip.GzipFile(fileobj=f) if gz else f  # type: ignore[return-value]


def iter_json_array(f: BinaryIO, name: str) -> Iterator[object]:
    """The elements of a top-level JSON array, parsed as a stream (memory holds one element and one block)."""
    text, dec = io.TextIOWrapper(f, encoding="utf-8"), json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def at(i: int) -> tuple[str, int]:  # the next non-space character at or after i, reading more as needed
        nonlocal buf, pos, eof
        while True:
            while i < len(buf) and buf[i].isspace():
                i += 1
            if i < len(buf) or eof:
                return (buf[i] if i < len(buf) else ""), i
            buf, i = buf[i:] + text.read(_BLOCK), 0
            eof = not buf

    ch, pos = at(0)
    if ch != "[":
        raise ValueError(f"{name}: a .json table must be one JSON array of rows (JSON lines go in .jsonl)")
    ch, pos = at(pos + 1)
    while ch != "]":
        while True:
            try:
                value, end = dec.raw_decode(buf, pos)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                if eof:
                    raise ValueError(f"{name}: invalid JSON array: {e}") from None
            more = text.read(_BLOCK)  # the element may go on past what was read
            buf, pos, eof = buf[pos:] + more, 0, not more
        yield value
        ch, pos = at(end)
        if ch == ",":
            ch, pos = at(pos + 1)
        elif ch != "]":
            raise ValueError(f"{name}: invalid JSON array: expected ',' or ']' after element, got {ch!r}")


class Table:
    """One table file: its row count, and its rows [start, end) with the needed columns (None: a bad JSON row)."""

    def __init__(self, url: str, fmt: str, cfg: UrlsSourceConfig) -> None:
        self.url, self.fmt, self.gz = url, fmt.removesuffix(".gz"), fmt.endswith(".gz")
        self.url_col, self.caption_col = cfg.url_col, cfg.caption_col
        extra = cfg.extra_cols
        self.columns = None if extra is None else list(dict.fromkeys([self.url_col, self.caption_col, *extra]))

    def _check(self, names: list[str], need: list[str]) -> None:
        for col in need:
            if col not in names:
                raise ValueError(f"{self.url}: no column '{col}' (columns: {', '.join(names)})")

    def _cols(self, names: list[str]) -> list[str]:
        return [c for c in self.columns if c in names] if self.columns is not None else names

    def count(self) -> int:
        """Rows in the table, read from metadata (parquet, arrow) or counted in one streaming pass."""
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(_random_access(self.url), buffer_size=_BLOCK)
            self._check(pf.schema_arrow.names, [self.url_col, self.caption_col])
            return pf.metadata.num_rows
        if self.fmt == "arrow":
            reader = pa.ipc.open_file(self._arrow_source())
            self._check(reader.schema.names, [self.url_col, self.caption_col])
            return reader.count_rows()
        if self.fmt in ("csv", "tsv", "txt"):
            return sum(b.num_rows for b in self._csv_batches([self.url_col]))
        return sum(1 for _ in self._json_rows())

    def rows(self, start: int, end: int) -> Iterator[dict | None]:
        """Rows ``start`` to ``end`` in file order."""
        if self.fmt in ("json", "jsonl"):
            for i, row in enumerate(self._json_rows()):
                if i >= end:
                    return
                if i >= start:
                    yield row
            return
        if self.fmt == "parquet":
            first, batches = self._parquet_batches(start, end)
        else:
            first, batches = 0, self._arrow_batches() if self.fmt == "arrow" else self._csv_batches(self.columns)
        for batch in batches:  # `first`: the table row of the batch's first row
            lo, hi = max(start - first, 0), min(end - first, batch.num_rows)
            if hi > lo:
                yield from batch.slice(lo, hi - lo).to_pylist()
            first += batch.num_rows
            if first >= end:
                return

    def _parquet_batches(self, start: int, end: int) -> tuple[int, Iterator]:
        """(first row of the first row group read, batches of the row groups overlapping [start, end))."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(_random_access(self.url), buffer_size=_BLOCK)  # column chunks read 1 MiB at a time
        md, groups, at, first = pf.metadata, [], 0, 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if at < end and at + n > start:
                first = first if groups else at
                groups.append(g)
            at += n
        if not groups:
            return 0, iter(())
        return first, pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, use_threads=False,
                                      columns=self._cols(pf.schema_arrow.names))

    def _arrow_source(self) -> Any:
        return pa.memory_map(str(storage.local_path(self.url))) if not storage.is_s3(self.url) else \
            _random_access(self.url)

    def _arrow_batches(self) -> Iterator:
        reader = pa.ipc.open_file(self._arrow_source())
        cols = self._cols(reader.schema.names)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i).select(cols)  # memory-mapped locally: a skipped batch costs its header

    def _csv_batches(self, columns: list[str] | None) -> Iterator:
        """Record batches of a csv/tsv/txt table in 1 MiB blocks, converting only ``columns`` (None: all)."""
        import pyarrow.csv as pcsv

        txt = self.fmt == "txt"
        parse = pcsv.ParseOptions(delimiter="\x1f", quote_char=False) if txt else \
            pcsv.ParseOptions(delimiter="\t" if self.fmt == "tsv" else ",")
        read = pcsv.ReadOptions(block_size=_BLOCK, column_names=[self.url_col] if txt else None)
        with _stream(self.url, self.gz) as f:  # the header first: a missing column is named, with the others
            names = pcsv.open_csv(f, read_options=read, parse_options=parse).schema.names
        self._check(names, [self.url_col] if txt else [self.url_col, self.caption_col])
        conv = pcsv.ConvertOptions(column_types={self.url_col: pa.string(), self.caption_col: pa.string()},
                                   include_columns=[c for c in columns if c in names] if columns else None)
        with _stream(self.url, self.gz) as f:
            yield from pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=conv)

    def _json_rows(self) -> Iterator[dict | None]:
        with _stream(self.url, self.gz) as f:
            if self.fmt == "json":
                for row in iter_json_array(f, self.url):
                    yield row if isinstance(row, dict) else None
                return
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    row = None
                yield row if isinstance(row, dict) else None


class UrlsSource:
    """Rows of url tables, downloaded over HTTP (or read from local paths / s3:// urls)."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg, self.opts = cfg, cfg.section()
        self.downloader = Downloader(self.opts)

    def files(self) -> list[str]:
        """The table files, sorted: the path itself, or the tables under it."""
        path = self.cfg.path
        if storage.is_s3(path) and storage.exists(path) or not storage.is_s3(path) and os.path.isfile(path):
            return [path]
        found = []
        for u in storage.list_prefix(path):
            try:
                table_format(u, self.opts.format)
            except ValueError:
                continue  # not a table (a README, a _SUCCESS marker)
            found.append(u)
        if not found:
            raise FileNotFoundError(f"no url tables ({', '.join(sorted(_EXT_FORMAT))}, text ones also .gz) at {path}")
        return found

    def _table(self, url: str) -> Table:
        return Table(url, table_format(url, self.opts.format), self.opts)

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """Row ranges of each file, in file order, truncated to ``limit`` rows in total (rows counted, not loaded)."""
        if samples_per_partition < 1:
            raise ValueError(f"samples_per_partition must be >= 1, got {samples_per_partition}")
        parts, remaining = [], self.cfg.limit
        files = self.files()
        for url in files:
            n = self._table(url).count()
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
        rows = list(self._table(p["file"]).rows(p["start"], p["end"]))
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
            yield RawSample("urls", sid, res.data, row.get(self.opts.caption_col), meta, res.error, res.detail)

    def _url(self, row: dict | None) -> str:
        value = None if row is None else row.get(self.opts.url_col)
        return value.strip() if isinstance(value, str) else ""

    def _extra(self, row: dict) -> dict:
        skip = {self.opts.url_col, self.opts.caption_col}
        keep = self.opts.extra_cols
        return {k: v for k, v in row.items() if k not in skip and (keep is None or k in keep)}


@SOURCES.register("urls")
def _build(cfg: SourceConfig) -> UrlsSource:
    return UrlsSource(cfg)
