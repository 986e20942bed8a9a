"""tessera.log.progress: rank 0 only, rates in the line, plain rate-limited lines off a terminal."""

from __future__ import annotations

import io

import pytest

from tessera.log import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_prints_plain_lines_at_most_every_interval() -> None:
    out = io.StringIO()
    with progress(total=1000, desc="train", unit="sample", file=out, rank=0, every_s=3600) as bar:
        for _ in range(100):
            bar.update(10)
            bar.set_postfix(loss=0.5)  # tqdm redraws on every set_postfix; the log must not
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2, lines  # the start line and the final line, nothing in between
    assert lines[0].startswith("train: 0/1000 sample (0%)")
    assert lines[1].startswith("train: 1000/1000 sample (100%)") and "sample/s" in lines[1]
    assert "loss=0.5" in lines[1]


def test_interval_zero_prints_every_redraw() -> None:
    out = io.StringIO()
    bar = progress(desc="shards", unit="shard", file=out, rank=0, every_s=0)
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(samples=7)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) > 3 and lines[-1].startswith("shards: 3 shard [") and "shard/s" in lines[-1]


def test_iterating_yields_everything_and_takes_the_total_from_len() -> None:
    out = io.StringIO()
    assert list(progress(range(7), desc="items", file=out, rank=0)) == list(range(7))
    assert out.getvalue().splitlines()[-1].startswith("items: 7/7 it (100%)")


def test_only_rank_0_shows_a_bar(monkeypatch) -> None:
    out = io.StringIO()
    bar = progress(total=3, desc="x", file=out, rank=1)
    bar.update(3)
    bar.set_postfix(a=1)
    bar.close()
    monkeypatch.setenv("RANK", "2")
    progress(range(3), file=out).close()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TESSERA_NO_PROGRESS", "1")
    progress(range(3), file=out).close()
    assert out.getvalue() == ""


@pytest.mark.parametrize("stream,redraws_in_place", [(Terminal(), True), (io.StringIO(), False)])
def test_a_terminal_gets_a_redrawn_bar(stream, redraws_in_place) -> None:
    with progress(total=4, desc="t", file=stream, rank=0) as bar:
        bar.update(4)
    assert ("\r" in stream.getvalue()) == redraws_in_place
