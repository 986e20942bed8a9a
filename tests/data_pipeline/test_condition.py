"""``tessera data condition``: KEY.cond.<name>.png per sample (at the image's size), manifest settings, resume after a
lost shard, a refused rerun with other settings, counted holes, and Ray giving the local executor's bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tessera.config import ConfigError, from_dict
from tessera.data_pipeline.condition import run_condition
from tessera.data_pipeline.condition_config import ConditionJobConfig
from tessera.evaluation.annotators import AnnotatorConfig, build_annotator
from tests.trainer.control_data import write_moving_shapes

CONDITIONS = {"canny": {"name": "canny"}, "layout": {"name": "colour_layout", "options": {"block": 4}},
              "soft": {"name": "soft_edge"}, "gray": {"name": "grayscale"}}


def make_cfg(source, output, conditions=None, **kw) -> ConditionJobConfig:
    """A local-executor condition job."""
    data = {"source": str(source), "output": str(output), "conditions": conditions or CONDITIONS,
            "executor": "local", "batch_size": 5, "ray": {"num_cpus": 2, "object_store_memory_mb": 200}, **kw}
    return from_dict(ConditionJobConfig, data, "test")


def members(tar: Path) -> dict[str, bytes]:
    """name -> bytes of a shard tar."""
    with tarfile.open(tar) as tf:
        return {i.name: tf.extractfile(i).read() for i in tf}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """24 moving-shape samples (32x32) in 3 shards."""
    return write_moving_shapes(tmp_path_factory.mktemp("cond") / "src", n=24, size=32, shards=3)


def test_conditions_written_with_manifest_and_resume(source, tmp_path):
    out = tmp_path / "out"
    m = run_condition(make_cfg(source, out))
    assert m["condition"]["samples"] == 24 and m["lineage"]["source"] == str(source)
    assert m["conditions"]["canny"] == {"member": "cond.canny.png", "written": 24,
                                        "annotator": {"name": "canny", "settings": {
                                            "low": 100, "high": 200, "blur": 0.0, "aperture": 3,
                                            "l2_gradient": False, "tolerance": 1}}}
    assert m["conditions"]["layout"]["annotator"]["settings"] == {"block": 4}
    tar = members(out / "shards/00000.tar")
    src = members(source / "shards/00000.tar")
    assert all(tar[k] == v for k, v in src.items())  # originals unchanged
    key = next(k[:-4] for k in src if k.endswith(".png"))
    img = np.asarray(Image.open(io.BytesIO(src[f"{key}.png"])).convert("RGB"))
    for name, a in CONDITIONS.items():
        got = np.asarray(Image.open(io.BytesIO(tar[f"{key}.cond.{name}.png"])))
        want = build_annotator(from_dict(AnnotatorConfig, a, "t")).annotate([img])[0]
        assert np.array_equal(got, want) and got.shape[:2] == img.shape[:2]  # the image's bucket
    first = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    # A crash that lost shard 1: the rerun redoes it alone, with the same bytes, and keeps the others.
    (out / "shards/00001.stats.json").unlink()
    (out / "shards/00001.tar").unlink()
    before = (out / "shards/00000.stats.json").stat().st_mtime_ns
    run_condition(make_cfg(source, out))
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == first
    assert (out / "shards/00000.stats.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"another fingerprint .*conditions\.canny\.settings\.high"):
        run_condition(make_cfg(source, out, {**CONDITIONS, "canny": {"name": "canny", "options": {"high": 150}}}))


def test_missing_image_is_counted_and_existing_condition_refused(source, tmp_path):
    broken = tmp_path / "src"
    (broken / "shards").mkdir(parents=True)
    man = json.loads((source / "manifest.json").read_text())
    man["shards"] = man["shards"][:1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # the first sample loses its image
        for name, data in members(source / "shards/00000.tar").items():
            if not name.endswith(".png") or name.startswith("m00k00001"):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    (broken / "shards/00000.tar").write_bytes(buf.getvalue())
    import hashlib

    man["shards"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(man))
    m = run_condition(make_cfg(broken, tmp_path / "out", {"canny": {"name": "canny"}}))
    assert m["conditions"]["canny"]["written"] == 1 and m["conditions"]["canny"]["missing_image"] == 7
    again = tmp_path / "again"  # conditioning a conditioned dataset under the same name: refused, names the key
    from tessera.data_pipeline.condition import ConditionError

    with pytest.raises(ConditionError, match="already has m00k00001.cond.canny.png"):
        run_condition(make_cfg(tmp_path / "out", again, {"canny": {"name": "canny"}}, max_task_retries=0))


def test_ray_gives_the_local_bytes(source, tmp_path):
    local = tmp_path / "local"
    run_condition(make_cfg(source, local, {"canny": {"name": "canny"}}))
    ray = tmp_path / "ray"
    run_condition(make_cfg(source, ray, {"canny": {"name": "canny"}}, executor="ray"))
    assert [p.read_bytes() for p in sorted((ray / "shards").glob("*.tar"))] == \
        [p.read_bytes() for p in sorted((local / "shards").glob("*.tar"))]


def test_cli_runs_the_shipped_config(source, tmp_path):
    import subprocess
    import sys

    from tests.trainer.helpers import ROOT, env

    out = subprocess.run([sys.executable, "-m", "tessera.cli", "data", "condition", "--config",
                          "configs/data/condition_canny.yaml", f"source={source}", f"output={tmp_path / 'out'}",
                          "executor=local"], env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "conditioned 24 samples in 3 shards" in out.stdout and "canny: 24 written as KEY.cond.canny.png" in out.stdout
