"""Benchmark: the ``urls`` source on a 1M-row parquet url table (LAION-like columns), against reading the whole
table as Python dicts (what the source did before issue #29, and what a partition costs when it loads its file).

Three figures, each from >= 3 alternating runs (bench/harness.py):

* planning: the driver's ``partitions()`` (rows from the parquet footer) vs loading the table to count its rows;
* one partition's table read (10,000 rows from the middle): its row groups and two columns vs the whole table;
* the peak RSS (VmHWM from /proc) of a fresh process that reads one whole partition -- table rows *and* the 10,000
  downloads (urls point at one local image, so no network) -- vs one that loads the whole table and slices it.

    .venv/bin/python bench/urls_scale.py [--rows 1000000] [--per-partition 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402

# The pre-#29 partition read: the whole table as dicts (data_pipeline/sources/urls.py load_rows), then a slice.
_WHOLE = """
import io, json, sys
import pyarrow.parquet as pq
from tessera import storage
path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = pq.read_table(io.BytesIO(storage.read_bytes(path))).to_pylist()[start:end]
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"rows": len(rows), "peak_mib": peak}))
"""
# This source's whole partition: its rows (row groups, columns) and their downloads.
_OURS = """
import json, sys
from tessera.data_pipeline.sources import Partition, SourceConfig, UrlsSourceConfig
from tessera.data_pipeline.sources.urls import UrlsSource
path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
src = UrlsSource(SourceConfig(name="urls", path=path, urls=UrlsSourceConfig(threads=16)))
part = Partition("urls", 0, {"file": path, "rel": "t.parquet", "start": start, "end": end})
n = bad = 0
for s in src.read(part):
    n += 1
    bad += s.error is not None
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"rows": n, "errors": bad, "peak_mib": peak}))
"""


def write_table(path: str, rows: int, image: str) -> None:
    """A LAION-like url table: url, caption and six metadata columns, written with pyarrow's defaults."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    table = pa.table({"url": [image] * rows,
                      "caption": [f"a photo of item {i} on a wooden table, high quality, {i % 97} colours"
                                  for i in range(rows)],
                      "width": rng.integers(64, 2048, rows), "height": rng.integers(64, 2048, rows),
                      "similarity": rng.random(rows), "punsafe": rng.random(rows), "pwatermark": rng.random(rows),
                      "key": [f"{i:09d}" for i in range(rows)]})
    pq.write_table(table, path)


def _timed(fn):
    """A harness run: (seconds, details) of one call of ``fn`` (which returns its details)."""
    def run():
        t = time.perf_counter()
        details = fn()
        return time.perf_counter() - t, details
    return run


def _peak(code: str, path: str, start: int, end: int):
    """A harness run: the peak RSS (MiB) of a fresh process running ``code`` on rows [start, end)."""
    def run():
        out = subprocess.run([sys.executable, "-c", code, path, str(start), str(end)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        got = json.loads(out.stdout.strip().splitlines()[-1])
        return got["peak_mib"], got
    return run


def compare(report: Report, path: str, rows: int, per_part: int, repeats: int) -> None:
    """The three comparisons on one table."""
    import pyarrow.parquet as pq

    from tessera import storage
    from tessera.data_pipeline.sources import SourceConfig
    from tessera.data_pipeline.sources.urls import Table, UrlsSource

    cfg, start = SourceConfig(name="urls", path=path), rows // 2
    end, peer = start + per_part, "whole table as dicts"

    def whole() -> list:
        return pq.read_table(io.BytesIO(storage.read_bytes(path))).to_pylist()

    report.compare(Comparison(name=f"plan {rows} rows", metric="s", higher_is_better=False, peer=peer),
                   _timed(lambda: {"rows": len(whole())}),
                   _timed(lambda: {"partitions": len(UrlsSource(cfg).partitions(per_part))}), repeats=repeats)
    report.compare(Comparison(name=f"read the table rows of one partition ({per_part} rows)", metric="s",
                              higher_is_better=False, peer=peer),
                   _timed(lambda: {"rows": len(whole()[start:end])}),
                   _timed(lambda: {"rows": sum(1 for _ in Table(path, "parquet", cfg.section()).rows(start, end))}),
                   repeats=repeats)
    report.compare(Comparison(name="peak RSS of a process reading one partition (rows and downloads for ours)",
                              metric="MiB", higher_is_better=False, peer=peer),
                   _peak(_WHOLE, path, start, end), _peak(_OURS, path, start, end), repeats=repeats)


def main() -> None:
    """Write the table, run the three comparisons, write bench/results/urls_scale.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--per-partition", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import pyarrow.parquet as pq
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-urls-") as tmp:
        image = os.path.join(tmp, "img.jpg")
        Image.new("RGB", (64, 64), (200, 100, 50)).save(image)
        path = os.path.join(tmp, "t.parquet")
        write_table(path, args.rows, image)
        groups = pq.ParquetFile(path).metadata.num_row_groups
        print(f"wrote {args.rows} rows ({os.path.getsize(path) / 2**20:.1f} MiB, {groups} row group(s)) to {path}")
        report = Report("urls_scale", vars(args), ["pyarrow", "numpy"])
        compare(report, path, args.rows, args.per_partition, args.repeats)
        report.write()


if __name__ == "__main__":
    main()
