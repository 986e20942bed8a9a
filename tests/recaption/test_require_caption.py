"""``process.require_caption: false``: ingest keeps images without a usable caption (missing, empty or too short)
with an empty ``alt``, counted as ``kept_without_caption``; ``recaption`` captions them; training never sees an
empty caption. Enabled when the option lands in data_pipeline/process.py (and the counter in ingest/manifest)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tessera.config import from_dict



def _folder(root: Path, n: int = 12, uncaptioned: tuple[int, ...] = (1, 4, 5, 9)) -> Path:
    """``n`` real openclipart drawings as ``NN.png``; all but ``uncaptioned`` get a sidecar caption (odd ones blank)."""
    files = sorted(Path("/usr/share/openclipart/png/food").glob("*.png"))[:n]
    root.mkdir(parents=True)
    for i, f in enumerate(files):
        img = Image.open(f)
        img.thumbnail((96, 96))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        (root / f"{i:02d}.png").write_bytes(buf.getvalue())
        if i not in uncaptioned:
            (root / f"{i:02d}.txt").write_text(f"clip art of {f.stem.replace('_', ' ')}")
        elif i % 2:
            (root / f"{i:02d}.txt").write_text("   ")  # present but blank
    return root


def _ingest(src: Path, out: Path, require_caption: bool) -> dict:
    from tessera.data_pipeline.ingest import IngestConfig, run_ingest

    cfg = from_dict(IngestConfig, {
        "sources": [{"name": "folder", "path": str(src)}], "output": str(out), "samples_per_shard": 8,
        "executor": "local", "max_task_retries": 0, "dedup": {"near": False},
        "process": {"min_side": 32, "require_caption": require_caption,
                    "buckets": {"base_resolution": 32, "multiple": 16}}}, "test")
    return run_ingest(cfg)


def test_processor_keeps_an_uncaptioned_image_with_an_empty_alt():
    from tessera.data_pipeline.process import ProcessConfig, SampleProcessor
    from tessera.data_pipeline.sample import Processed, RawSample, Rejected

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png, "PNG")
    raws = [RawSample("folder", f"id{i}", png.getvalue(), cap, {"path": f"/x/{i}.png"})
            for i, cap in enumerate([None, "  ", "a red square"])]
    strict = SampleProcessor(ProcessConfig(min_side=32))
    assert [r.reason for r in strict.process_batch(raws)[:2]] == ["caption_missing", "caption_empty"]
    kept = SampleProcessor(ProcessConfig(min_side=32, require_caption=False)).process_batch(raws)
    assert all(isinstance(r, Processed) for r in kept)
    assert [(r.caption, r.meta["captions"]["alt"]) for r in kept] == [("", ""), ("", ""),
                                                                     ("a red square", "a red square")]
    assert not any(isinstance(r, Rejected) for r in kept)


def test_ingest_counts_them_recaption_captions_them_training_never_sees_empty(tmp_path):
    from tessera.recaption.config import RecaptionConfig
    from tessera.recaption.run import run_recaption
    from tessera.trainer.data import LoaderConfig, build_loader

    src = _folder(tmp_path / "src")
    strict = _ingest(src, tmp_path / "strict", require_caption=True)
    assert strict["totals"]["written"] == 8 and strict["reasons"] == {"caption_empty": 3, "caption_missing": 1}
    m = _ingest(src, tmp_path / "ingest", require_caption=False)
    assert m["totals"] == {"input": 12, "written": 12, "rejected": 0} and m["kept_without_caption"] == 4

    out = tmp_path / "rc"
    run_recaption(from_dict(RecaptionConfig, {"source": str(tmp_path / "ingest"), "output": str(out),
                                              "executor": "local",
                                              "captioners": [{"name": "attributes", "variant": "attributes"}]},
                            "test"))
    blank = set()
    for tar in sorted((out / "shards").glob("*.tar")):
        import tarfile

        with tarfile.open(tar) as t:
            for info in t:
                if info.name.endswith(".json"):
                    r = json.loads(t.extractfile(info).read())
                    if not r["captions"]["alt"]:
                        blank.add(r["key"])
                        assert r["captions"]["attributes"].startswith(("on a ", *("red", "orange", "yellow", "green",
                                                                                  "blue", "purple", "pink", "brown",
                                                                                  "black", "white", "grey")))
    assert len(blank) == 4
    loader = build_loader(LoaderConfig(path=str(out), batch_size=1, num_workers=0, epochs=3, shuffle_buffer=1,
                                       caption_variants={"alt": 0.3, "attributes": 0.7}), 0, 1)
    for batch in loader:
        assert all(c.strip() for c in batch["caption"])
        for key, variant in zip(batch["key"], batch["variant"]):
            assert not (key in blank and variant == "alt")
    stats = loader.stats()
    assert stats["skipped_total"] == 0 and stats["variant_fallbacks"] > 0  # blank alt drawn -> attributes
    only_alt = build_loader(LoaderConfig(path=str(out), batch_size=1, num_workers=0, epochs=1, shuffle_buffer=1), 0, 1)
    assert len({k for b in only_alt for k in b["key"]}) == 8
    assert only_alt.stats()["skipped_samples"] == {"empty_caption": 4}
