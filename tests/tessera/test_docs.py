"""The docs say only what is true: every ``configs/...`` path they quote exists, every ``tessera ...`` command line
parses and its config loads (tests/tessera/command_lines.py has the rule for usage synopses, which are skipped),
and docs/benchmarks.md is exactly what the benchmark results give."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tests.tessera import command_lines

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))  # their comments quote commands too
CONFIG_PATH = re.compile(r"(?<![\w./-])configs/[\w./-]*\.yaml")
MODULE_PATH = re.compile(r"`((?:[a-z_0-9]+/)+[a-z_0-9]+\.py)")  # `trainer/loop.py`, `diffusion/rng.py` (in trainer/)
MODULE_BASES = [ROOT, *(p for p in ROOT.iterdir() if (p / "__init__.py").is_file()), ROOT / "trainer"]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("doc", [_rel(p) for p in DOCS + CONFIGS])
def test_quoted_config_paths_exist_and_command_lines_run(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = sorted({p for p in CONFIG_PATH.findall(text) if not (ROOT / p).is_file()})
    assert not missing, f"{doc} quotes config files that do not exist: {missing}"
    stale = sorted({p for p in MODULE_PATH.findall(text) if not any((base / p).is_file() for base in MODULE_BASES)})
    assert not stale, f"{doc} names modules that do not exist: {stale}"
    problems = []
    for line, expected in command_lines.command_lines(text):
        if command_lines.is_synopsis(line):
            continue
        try:
            command_lines.check(line, expected)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, f"{doc}:\n" + "\n".join(problems)


def test_the_check_catches_a_stale_key_a_missing_config_and_a_wrong_error_message():
    text = "```\ntessera train --config configs/train/tiny_dit.yaml train.lr=1e-4\n```\n"
    ((line, _),) = command_lines.command_lines(text)
    with pytest.raises(AssertionError, match="train.lr"):
        command_lines.check(line)
    with pytest.raises(AssertionError, match="not found"):
        command_lines.check("tessera eval --config configs/eval/nope.yaml --checkpoint x")
    shown = "$ tessera train --config configs/train/tiny_dit.yaml optim.lr=-1\ntessera: error: something else\n"
    with pytest.raises(AssertionError):
        command_lines.check(*command_lines.command_lines(shown)[0])
    assert command_lines.is_synopsis("tessera jobs logs <job> --follow")
    assert command_lines.is_synopsis("tessera submit STAGE --config FILE")


def _writer():
    spec = importlib.util.spec_from_file_location("write_benchmarks_md", ROOT / "bench" / "write_benchmarks_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_page_is_what_the_results_give():
    """docs/benchmarks.md is written by bench/write_benchmarks_md.py from bench/results/*.json, never by hand."""
    writer = _writer()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == writer.render(writer.RESULTS), \
        "docs/benchmarks.md differs from bench/results/*.json: run bench/write_benchmarks_md.py"


def test_benchmarks_page_shows_the_measured_figures_and_check_catches_a_hand_edit(tmp_path):
    writer = _writer()
    side = lambda label, v: {"label": label, "values": v, "median": sorted(v)[1], "min": min(v), "max": max(v),  # noqa: E731
                             "spread": (max(v) - min(v)) / sorted(v)[1], "details": []}
    doc = {"benchmark": "frechet", "params": {}, "notes": {"values_rel_diff": 1e-7},
           "machine": {"date": "2026-12-03T10:00:00+00:00", "git_commit": "abc1234", "cores": 2, "cpu_model": "cpu",
                       "memory_gib": 24, "load_average": [0.5, 0.4, 0.3], "load_average_end": [1.0, 0.5, 0.3],
                       "command": "python bench/frechet.py", "threads_env": {"OMP_NUM_THREADS": "2"}},
           "comparisons": [{"name": "2048-d", "metric": "s", "higher_is_better": False, "peer": "pytorch-fid",
                            "ours": "tessera", "peer_runs": side("pytorch-fid", [11.0, 11.7, 12.1]),
                            "ours_runs": side("tessera", [0.57, 0.58, 0.61]), "ratio": 0.58 / 11.7,
                            "speedup": 11.7 / 0.58, "spread_max": 0.094, "warnings": []}]}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "frechet.json").write_text(json.dumps(doc))
    page = tmp_path / "benchmarks.md"
    assert writer.main(["--results", str(tmp_path / "results"), "--out", str(page)]) == 0
    text = page.read_text()
    assert "## frechet" in text and "2026-12-03" in text and "`abc1234`" in text and "OMP_NUM_THREADS=2" in text
    assert "| 2048-d | s (lower is better) | pytorch-fid | 11.7 (11-12.1, spread 9%, n=3) | 0.58 (0.57-0.61" in text
    assert "**20.17x**" in text and "values_rel_diff: 1e-07" in text
    assert writer.main(["--results", str(tmp_path / "results"), "--out", str(page), "--check"]) == 0
    page.write_text(text.replace("20.17x", "25x"))  # a figure edited by hand
    assert writer.main(["--results", str(tmp_path / "results"), "--out", str(page), "--check"]) == 1
