"""LoRA for supervised training (``tessera train`` with ``model.lora``), on real processes: the checkpoint holds only
the adapter and is small, a SIGKILL mid-run resumes bit for bit (with DreamBooth prior preservation on), the class
images really enter the loss, a LoRA paired with another base is refused, and the export carries the merged model
plus the adapter that PEFT (on Tessera's model and on diffusers' PixArt) loads to the same outputs."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from tests.trainer import helpers as H

pytestmark = [pytest.mark.slow]

STEPS = 8  # batch 4 on one rank
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    enc = H.tiny_text_encoder(tmp / "enc")
    H.tiny_dataset(tmp / "ds", buckets={"16x16": 1.0})
    H.tiny_dataset(tmp / "class", shards=1, per_shard=16, buckets={"16x16": 1.0}, seed=7)
    # two checkpoints: the last is the LoRA runs' base, the first another base's weights
    H.check(H.run_train(H.overrides(tmp, "base", str(tmp / "ds"), enc, **{"train.total_samples": 8,
                                                                            "train.ckpt_every_samples": 4})))
    return tmp, enc


def _ovs(work, run_id, **kw):
    tmp, enc = work
    ovs = {"train.total_samples": STEPS * 4, "train.ckpt_every_samples": 8, "model.init_from": str(tmp / "runs/base"),
           "model.lora.rank": 2, "model.lora.alpha": 4.0, "optim.lr": 0.01, "prior.path": str(tmp / "class"),
           "prior.weight": 1.0, "data.num_workers": 1}
    ovs.update(kw)
    return H.overrides(tmp, run_id, str(tmp / "ds"), enc, **ovs)


def _run(work, run_id) -> Path:
    return work[0] / "runs" / run_id


@pytest.fixture(scope="module")
def ref(work):
    H.check(H.run_train(_ovs(work, "ref")))
    return work


def _shard_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in (ckpt / "shards").iterdir())


def test_adapter_only_checkpoint_is_small_and_resumes_exactly_after_sigkill(ref):
    work = ref
    last = H.ckpt_dir(_run(work, "ref"), STEPS)
    index = json.loads((last / "index.json").read_text())
    names = set(index["params"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:5]
    assert not (last / "model.safetensors").exists()
    base_ckpt = H.ckpt_dir(_run(work, "base"), 2)
    assert _shard_bytes(last) < 0.15 * _shard_bytes(base_ckpt), (_shard_bytes(last), _shard_bytes(base_ckpt))

    run = "killed"
    kill_step = random.SystemRandom().randint(3, STEPS - 2)
    proc = H.start(H.train_cmd(_ovs(work, run)))
    H.wait_for(proc, lambda: H.metric_lines(_run(work, run)) >= kill_step and
               (_run(work, run) / "checkpoints" / "latest").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not H.ckpt_dir(_run(work, run), STEPS).exists()
    H.check(H.run_train(_ovs(work, run)))
    resumed = H.resumed_step(_run(work, run))
    assert resumed is not None and 1 <= resumed < STEPS, f"killed at step {kill_step}: no resume logged"
    assert H.losses(_run(work, run)) == H.losses(_run(work, "ref"))
    H.same_files(last, H.ckpt_dir(_run(work, run), STEPS))
    state = json.loads((H.ckpt_dir(_run(work, run), STEPS) / "loader" / "rank0.json").read_text())
    assert state["paired"] and state["prior"]["consumed"] > 0  # the class stream's position is saved and resumed


def test_class_images_enter_the_loss(ref):
    """The same run without prior preservation starts from the same loss (same base, draws and subject batch) and
    then diverges: the class batches changed the update."""
    work = ref
    H.check(H.run_train(_ovs(work, "no-prior", **{"prior.weight": 0.0})))
    with_prior, without = H.losses(_run(work, "ref")), H.losses(_run(work, "no-prior"))
    assert with_prior[0] == without[0]
    assert with_prior[1:] != without[1:]


def test_export_merges_and_ships_the_adapter_for_peft_and_diffusers(ref, tmp_path):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from tessera.trainer.export_diffusers import export_any
    from tessera.trainer.inference import load_for_sampling

    work = ref
    export_any(str(_run(work, "ref")), str(tmp_path / "tessera"))
    meta = json.loads((tmp_path / "tessera" / "tessera.json").read_text())
    assert meta["adapter"] == "lora" and meta["model"].get("lora") is None  # the export's model is the merged one
    x, t, txt = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 32)
    merged, *_ = load_for_sampling(str(tmp_path / "tessera"), use_ema=True, device=CPU)
    from_ckpt, *_ = load_for_sampling(str(_run(work, "ref")), use_ema=True, device=CPU)
    base, *_ = load_for_sampling(str(_run(work, "base")), use_ema=True, device=CPU)
    with torch.no_grad():
        want = merged(x, t, txt)
        assert torch.equal(from_ckpt(x, t, txt), want)
        assert (base(x, t, txt) - want).abs().max() > 1e-4  # the adapter moved the model
        got = PeftModel.from_pretrained(base, str(tmp_path / "tessera" / "lora"))(x, t, txt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # diffusers: the adapter for the base's PixArt transformer, the merged model beside it
    export_any(str(_run(work, "base")), str(tmp_path / "d-base"), fmt="diffusers")
    export_any(str(_run(work, "ref")), str(tmp_path / "d-lora"), fmt="diffusers")
    d_base = PixArtTransformer2DModel.from_pretrained(tmp_path / "d-base", subfolder="transformer").eval()
    d_merged = PixArtTransformer2DModel.from_pretrained(tmp_path / "d-lora", subfolder="transformer").eval()
    kw = dict(encoder_hidden_states=txt, timestep=t * 1000, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
    with torch.no_grad():
        want = d_merged(x, **kw)[0]
        assert (d_base(x, **kw)[0] - want).abs().max() > 1e-4
        got = PeftModel.from_pretrained(d_base, str(tmp_path / "d-lora" / "lora"))(x, **kw)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_adapter_on_another_base_is_refused(ref):
    """The checkpoint pins its base's weight fingerprint: the adapter loaded onto other base weights fails loudly."""
    import dataclasses

    from tessera.trainer import consolidate
    from tessera.trainer.inference import job_config, model_from_weights
    from tessera.trainer.lora import LoraBaseMismatch

    work = ref
    ckpt = str(H.ckpt_dir(_run(work, "ref"), STEPS))
    cfg, weights = job_config(ckpt), consolidate.read_weights(ckpt, "raw")
    model_from_weights(cfg.model, weights, CPU)  # its own base: fine
    moved = dataclasses.replace(cfg.model, init_from=str(H.ckpt_dir(_run(work, "base"), 1)))
    with pytest.raises(LoraBaseMismatch, match="fingerprint"):
        model_from_weights(moved, weights, CPU)
