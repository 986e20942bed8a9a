"""What a recaption output is tied to: the captioner's weights (not only their path) and the source dataset's
manifest. A rerun into an interrupted output with other weights or another source is refused, never resumed; an
output whose finished shards have lost their job record is refused too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tessera.config import ConfigError
from tessera.recaption.run import RecaptionError, run_recaption
from tessera.recaption.worker import ShardCaptioner
from tests.recaption.conftest import blip_captioner, make_cfg

ATTRIBUTES = {"name": "attributes", "variant": "attributes"}


def _interrupted(cfg, monkeypatch) -> None:
    """Run ``cfg`` with shard 00001 failing: the other shards finish, the job record stays in _staging."""
    real = ShardCaptioner.process

    def failing(self, task):
        if task["name"].endswith("00001.tar"):
            raise OSError("node lost")
        return real(self, task)

    with monkeypatch.context() as m:
        m.setattr(ShardCaptioner, "process", failing)
        with pytest.raises(RecaptionError):
            run_recaption(cfg)
    assert not (Path(cfg.output) / "manifest.json").exists()


def test_new_weights_at_the_same_path_do_not_resume_into_the_old_output(emoji_ds, tiny_blip, tmp_path, monkeypatch):
    model, out = tmp_path / "blip", tmp_path / "out"
    shutil.copytree(tiny_blip, model)
    caps = [blip_captioner(model, sampling={"max_new_tokens": 3})]
    _interrupted(make_cfg(emoji_ds, out, caps), monkeypatch)
    (weights,) = model.glob("*.safetensors")
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 16)
    state[name] = state[name] + 0.01  # fine-tuned weights saved over the old ones: same path, same config
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"another job fingerprint.*differs in weights\.blip"):
        run_recaption(make_cfg(emoji_ds, out, caps))


def test_a_reingested_source_is_refused_into_the_old_output(emoji_ds, tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(emoji_ds, src)
    _interrupted(make_cfg(src, out, [ATTRIBUTES]), monkeypatch)
    manifest = (src / "manifest.json").read_text()
    (src / "manifest.json").write_text(manifest.replace("{", "{ ", 1))  # a re-ingest: the manifest's bytes change
    with pytest.raises(ConfigError, match=r"another job fingerprint.*differs in source"):
        run_recaption(make_cfg(src, out, [ATTRIBUTES]))
    (src / "manifest.json").write_text(manifest)  # the same source again: the interrupted run resumes and finishes
    done = run_recaption(make_cfg(src, out, [ATTRIBUTES]))
    assert len(done["shards"]) == 3 and done["lineage"]["source"] == str(src)


def test_finished_shards_without_a_job_record_are_refused(emoji_ds, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(make_cfg(emoji_ds, out, [ATTRIBUTES]), monkeypatch)
    shutil.rmtree(out / "_staging")
    with pytest.raises(ConfigError, match=r"finished shard\(s\).*no _staging/run.json"):
        run_recaption(make_cfg(emoji_ds, out, [ATTRIBUTES]))
