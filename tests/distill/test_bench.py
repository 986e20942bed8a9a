"""bench/distill.py's short form on the tiny flow teacher: one lcm student, k = 4, 3 seeds, 8 held-out images (the
Inception passes dominate its time): every row (student and teacher at k, the teacher at its full steps) has a
median and spread over the seeds, the goal is judged, and the student | teacher grid is drawn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from tests.distill import helpers as D

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes of Inception passes: make test-long

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distill.py"


def _bench_module():
    """bench/distill.py by path (the name ``distill`` is the repository's package folder)."""
    spec = importlib.util.spec_from_file_location("bench_distill", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_short_form(teachers, monkeypatch):
    bench = _bench_module()

    tmp = teachers["tmp"]
    result = bench.bench(str(teachers["flow"]), tmp / "holdout", tmp / "fid-cache", tmp / "bench", ["lcm"], 32, None,
                         1, [4], [0, 1, 2], 8, ["a red square", "a blue circle"], (16, 16),
                         configs={"lcm": D.CONFIG}, uniform=False)
    rows = {(r["model"], r["k"]): r for r in result["summary"]}
    assert set(rows) == {("teacher full", 16), ("teacher", 4), ("lcm", 4)}
    for r in rows.values():
        assert r["seeds"] == 3 and r["fid_min"] <= r["fid"] <= r["fid_max"] and r["ms_per_image"] > 0
        assert 0.0 <= r["colour_adherence_min"] <= r["colour_adherence"] <= r["colour_adherence_max"] <= 1.0
    assert rows["lcm", 4]["sampler"] == "lcm" and rows["teacher", 4]["sampler"] == "euler"
    g = result["goal"]["lcm"]
    assert g["fid_ratio_to_full"] == round(rows["lcm", 4]["fid"] / rows["teacher full", 16]["fid"], 3)
    assert isinstance(g["met"], bool)
    sheet = Image.open(result["grids"]["4"])
    assert sheet.width > 2 * 32  # the student's panel beside the teacher's
    assert (tmp / "bench" / "report.html").stat().st_size > 0

    # The teacher's rows are kept by its weights' fingerprint: a second evaluation measures no teacher row again.
    import json

    from tessera.quickstart import evaluate as E

    known = json.loads((tmp / "fid-cache" / "distill_teacher_records.json").read_text())
    assert len(known) == 6  # (full, k=4) x 3 seeds

    def no_measuring(*a, **k):
        raise AssertionError("a cached teacher row was measured again")

    monkeypatch.setattr(E.FID, "__call__", no_measuring)
    again = bench.evaluate(str(teachers["flow"]), {}, tmp / "holdout", tmp / "fid-cache", [4], [0, 1, 2], 8,
                           uniform=False)
    assert sorted((r["model"], r["k"], r["seed"], r["fid"]) for r in again) == sorted(
        (r["model"], r["k"], r["seed"], r["fid"]) for r in result["records"] if r["model"].startswith("teacher"))
