"""Training a control branch end to end (`tessera train` with ``model.control``) on a tiny DiT base: the base stays
frozen and out of the checkpoint, condition dropout is counted, a resume is exact, 2 ranks train like 1 rank with
accumulation, `tessera sample --control` at scale 0 is the base model, and a branch paired with another base is
refused by the sampler and by a resume."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer import helpers as H
from tests.trainer.control_data import write_moving_shapes

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CONTROL = "{condition: canny, blocks: 1, dropout: 0.5}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(tmp, encoder, conditioned dataset, base run): a base trained for 4 steps on the images alone."""
    from tessera.config import from_dict
    from tessera.data_pipeline.condition import run_condition
    from tessera.data_pipeline.condition_config import ConditionJobConfig

    tmp = tmp_path_factory.mktemp("ctl")
    enc = H.tiny_text_encoder(tmp / "enc")
    write_moving_shapes(tmp / "src", n=64, size=16, shards=2)
    run_condition(from_dict(ConditionJobConfig, {"source": str(tmp / "src"), "output": str(tmp / "cond"),
                                                 "conditions": {"canny": {"name": "canny"}}, "executor": "local"}, "t"))
    H.check(H.run_train(H.overrides(tmp, "base", str(tmp / "src"), enc, **{
        "train.total_samples": 16, "train.ckpt_every_samples": 8})))
    Image.fromarray(np.pad(np.full((6, 6), 255, np.uint8), 5)).save(tmp / "grid_cond.png")  # a 16x16 edge map
    return tmp, enc, str(tmp / "cond"), tmp / "runs" / "base"


def _ovs(work, run_id, **kw):
    tmp, enc, ds, base = work
    common = {"model.init_from": str(base), "model.control": CONTROL, "data.shuffle_buffer": 0,
              "samples.enabled": "true", "samples.control_images": f"[{tmp / 'grid_cond.png'}, {tmp / 'grid_cond.png'}]",
              "train.total_samples": 32, "train.ckpt_every_samples": 16, "optim.lr": 0.01}
    return H.overrides(tmp, run_id, ds, enc, **{**common, **kw})


ONE_RANK = {"data.batch_size": 2, "optim.grad_accum": 2, "data.num_workers": 2}


@pytest.fixture(scope="module")
def ref(work):
    """The uninterrupted control run (1 rank, 2 micro-batches of 2, 2 loader workers: 8 steps)."""
    H.check(H.run_train(_ovs(work, "ref", **ONE_RANK)))
    return work[0] / "runs" / "ref"


def test_branch_trains_alone_and_dropout_is_counted(ref):
    rows = H.metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, 9))
    dropped = sum(r.get("onthefly/control_dropped", 0) for r in rows)
    assert 4 < dropped < 28, dropped  # dropout 0.5 of 32 samples, per-sample draws
    w = H.ckpt_tensors(H.ckpt_dir(ref, 8))
    assert w and all(k.startswith("control.") for k in w)  # the frozen base is not checkpointed
    zero_out = w["control.after_proj.0.weight"]
    assert zero_out.abs().sum() > 0  # the zero-initialised output projection has trained
    grid = Image.open(ref / "samples" / f"step_{8:09d}.png")  # conditions above images, one column per prompt
    assert grid.size[1] > 2 * 16


def test_resume_is_exact_and_two_ranks_train_like_one(work, ref):
    H.check(H.run_train(_ovs(work, "resumed", **ONE_RANK, **{"train.resume": str(H.ckpt_dir(ref, 4))})))
    resumed = work[0] / "runs" / "resumed"
    assert H.metrics(resumed)[0]["step"] == 5
    assert H.losses(resumed) == H.losses(ref)[4:]
    H.same_files(H.ckpt_dir(ref, 8), H.ckpt_dir(resumed, 8))
    H.check(H.run_train(_ovs(work, "two", **{"data.batch_size": 2}), nproc=2))
    two = work[0] / "runs" / "two"
    assert H.losses(two) == pytest.approx(H.losses(ref), rel=1e-5)
    a, b = H.ckpt_tensors(H.ckpt_dir(ref, 8)), H.ckpt_tensors(H.ckpt_dir(two, 8))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_sample_control_scale_and_wrong_base_refused(work, ref, tmp_path):
    from tessera.trainer import inference as I
    from tessera.trainer.models.control import ControlBaseMismatch

    tmp, _, ds, base = work
    cond = tmp_path / "cond.png"
    Image.fromarray(np.pad(np.full((6, 6), 255, np.uint8), 5)).save(cond)  # a 16x16 edge map
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "tessera.cli", "sample", "--checkpoint", str(ref), "--prompt", "a red circle",
           "--prompt", "a blue square", "--control", str(cond), "--control-scale", "1.5", "--steps", "3",
           "--out", str(out)]
    H.check(subprocess.run(cmd, env=H.env(), capture_output=True, text=True, timeout=300, cwd=H.ROOT))
    assert Image.open(out).size[1] > 2 * 16  # conditions above images
    model, te, ae, obj, smp, _ = I.load_for_sampling(str(ref))
    kw = dict(height=16, width=16, seed=0, device=torch.device("cpu"), controls=[Image.open(cond).convert("RGB")])
    on = I.generate(model, te, ae, smp, obj, ["a red circle"], control_scale=1.0, **kw)
    off = I.generate(model, te, ae, smp, obj, ["a red circle"], control_scale=0.0, **kw)
    bmodel, *_ = I.load_for_sampling(str(base))
    plain = I.generate(bmodel, te, ae, smp, obj, ["a red circle"], height=16, width=16, seed=0,
                       device=torch.device("cpu"))
    assert np.array_equal(np.asarray(off[0]), np.asarray(plain[0]))  # scale 0: the base model
    assert not np.array_equal(np.asarray(on[0]), np.asarray(off[0]))
    cfg = I.job_config(str(ref))  # the branch paired with an earlier checkpoint of the base: refused
    cfg.model.init_from = str(H.ckpt_dir(base, 2))
    with pytest.raises(ControlBaseMismatch, match="trained on a base model with weights fingerprint"):
        I.model_from_weights(cfg.model, I.consolidate.read_weights(str(H.ckpt_dir(ref, 8)), "ema"),
                             torch.device("cpu"))
    # (no loader workers: with workers alive, a run whose first step raises did not exit; see the report)
    bad = H.run_train(_ovs(work, "wrong", **{**ONE_RANK, "data.num_workers": 0}, **{
        "train.resume": str(H.ckpt_dir(ref, 4)), "model.init_from": str(H.ckpt_dir(base, 2))}), timeout=300)
    assert bad.returncode != 0 and "ControlBaseMismatch" in bad.stderr and "pair it with the base" in bad.stderr
