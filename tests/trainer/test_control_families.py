"""Control branches of the MMDiT (SD3 ControlNet) and UNet (diffusers' ControlNetModel) families trained end to end
through `tessera train` with ``model.control``, as tests/trainer/test_control_train.py does for the DiT: only the
branch trains (the optimizer holds nothing else, and the base sampled back is bit for bit the fingerprinted base),
a checkpoint is written, `tessera sample --control` (``inference.sample_from``) samples from it, and a resume
continues from the checkpoint exactly.

Tiny sizes keep each family to a few training steps: a seeded, perturbed tiny base (``save_pretrained``, so its
zero-initialised output layers are live and gradients reach the branch) on 16-px moving shapes with Canny edges."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer import helpers as H
from tests.trainer.control_data import write_moving_shapes
from tests.trainer.models.conftest import perturb

pytestmark = [pytest.mark.slow, pytest.mark.long]  # the DiT branch's runs are in test_control_train.py

# Pixel space (identity autoencoder, 3 channels) like tiny_train.yaml's DiT; the UNet's ControlNet embeds the
# condition at the latent's own size (vae_scale_factor 1: one conditioning layer, no downsampling).
SECTIONS = {"mmdit": "{preset: tiny, in_channels: 3}",
            "unet": "{preset: tiny, vae_scale_factor: 1, kwargs: {in_channels: 3, out_channels: 3}}"}
CONTROL = {"mmdit": "{condition: canny, blocks: 1}", "unet": "{condition: canny}"}
# The branch's zero-initialised outputs: trained, they are no longer zero.
ZERO_OUT = {"mmdit": ["control.controlnet_blocks.0.weight", "control.input_embedder.weight"],
            "unet": ["control.controlnet_down_blocks.0.weight", "control.controlnet_mid_block.weight"]}
STEPS = 4  # 16 samples, batch 4; checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(tmp, encoder, conditioned dataset, a 16x16 edge map)."""
    from tessera.config import from_dict
    from tessera.data_pipeline.condition import run_condition
    from tessera.data_pipeline.condition_config import ConditionJobConfig

    tmp = tmp_path_factory.mktemp("ctlfam")
    enc = H.tiny_text_encoder(tmp / "enc")
    write_moving_shapes(tmp / "src", n=16, size=16, shards=1)
    run_condition(from_dict(ConditionJobConfig, {"source": str(tmp / "src"), "output": str(tmp / "cond"),
                                                 "conditions": {"canny": {"name": "canny"}}, "executor": "local"}, "t"))
    cond = tmp / "edge.png"
    Image.fromarray(np.pad(np.full((6, 6), 255, np.uint8), 5)).save(cond)
    return tmp, enc, str(tmp / "cond"), cond


def _family_ovs(family: str) -> dict:
    return {"model.name": family, "model.dit": "null", f"model.{family}": SECTIONS[family]}


def _base(tmp, enc, family: str):
    """A seeded tiny base of ``family`` written with ``save_pretrained``; returns its folder."""
    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.models import save_pretrained

    out = tmp / f"base_{family}"
    if not out.exists():
        ovs = [f"{k}={v}" for k, v in {**_family_ovs(family), "text_encoder.t5.path": enc}.items()]
        torch.manual_seed(0)
        save_pretrained(perturb(load_config(TrainJobConfig, H.TINY_CONFIG, ovs).model.build()), out)
    return out


def _ovs(data, family: str, run_id: str, **kw) -> list[str]:
    tmp, enc, ds, cond = data
    return H.overrides(tmp, run_id, ds, enc, **{
        **_family_ovs(family), "model.init_from": str(_base(tmp, enc, family)), "model.control": CONTROL[family],
        "data.shuffle_buffer": 0, "data.batch_size": 4, "train.total_samples": 4 * STEPS,
        "train.ckpt_every_samples": 8, "optim.lr": 0.01, "samples.enabled": "true",
        "samples.control_images": f"[{cond}, {cond}]", "samples.sampler.steps": 2, **kw})


@pytest.mark.parametrize("family", ["mmdit", "unet"])
def test_family_trains_samples_and_resumes(data, family, tmp_path):
    from tessera.trainer import consolidate
    from tessera.trainer import inference as I
    from tessera.trainer.models import load_pretrained
    from tessera.trainer.models.pinned import weights_fingerprint

    tmp, _, _, cond = data
    H.check(H.run_train(_ovs(data, family, f"{family}_ref")))
    ref = tmp / "runs" / f"{family}_ref"
    assert [r["step"] for r in H.metrics(ref)] == list(range(1, STEPS + 1))
    ckpt = H.ckpt_dir(ref, STEPS)
    assert (ckpt / "index.json").is_file() and (ref / "samples" / f"step_{STEPS:09d}.png").is_file()

    # Only the branch trained: the checkpoint and the optimizer state hold the branch alone, and its zero-initialised
    # outputs moved.
    w = H.ckpt_tensors(ckpt)
    assert w and all(k.startswith("control.") for k in w)
    assert set(H.ckpt_tensors(ckpt, "exp_avg")) == set(w)
    assert all(w[k].abs().sum() > 0 for k in ZERO_OUT[family]), {k: float(w[k].abs().sum()) for k in ZERO_OUT[family]}
    # The base the branch samples with is bit for bit the base it was trained on (the fingerprint it carries).
    base = load_pretrained(_base(*data[:2], family))
    saved = consolidate.read_weights(str(ckpt), "ema")["buffer/base_fingerprint"]
    assert bytes(saved.to(torch.uint8).tolist()) == weights_fingerprint(base)
    model, te, ae, obj, smp, _ = I.load_for_sampling(str(ref), device=torch.device("cpu"))
    mine, theirs = model.base.state_dict(), base.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)

    # `tessera sample --control IMAGE --control-scale S`: conditions above images; scale 0 is the base model.
    out = tmp_path / "grid.png"
    I.sample_from(str(ref), ["a red circle", "a blue square"], out=str(out), control=[str(cond)], control_scale=1.5,
                  steps=2)
    assert Image.open(out).size[1] > 2 * 16
    kw = dict(height=16, width=16, seed=0, device=torch.device("cpu"), controls=[Image.open(cond).convert("RGB")])
    smp = dataclasses.replace(smp, steps=2)
    on = I.generate(model, te, ae, smp, obj, ["a red circle"], control_scale=1.0, **kw)
    off = I.generate(model, te, ae, smp, obj, ["a red circle"], control_scale=0.0, **kw)
    plain = I.generate(base.eval(), te, ae, smp, obj, ["a red circle"], height=16, width=16, seed=0,
                       device=torch.device("cpu"))
    assert np.array_equal(np.asarray(off[0]), np.asarray(plain[0]))
    assert not np.array_equal(np.asarray(on[0]), np.asarray(off[0]))

    # A resume from the step-2 checkpoint continues there and lands on the same branch.
    H.check(H.run_train(_ovs(data, family, f"{family}_resumed", **{"train.resume": str(H.ckpt_dir(ref, 2)),
                                                                   "samples.enabled": "false"})))
    resumed = tmp / "runs" / f"{family}_resumed"
    assert H.resumed_step(resumed) == 2
    assert [r["step"] for r in H.metrics(resumed)] == list(range(3, STEPS + 1))
    assert H.losses(resumed) == H.losses(ref)[2:]
    H.same_files(H.ckpt_dir(ref, STEPS), H.ckpt_dir(resumed, STEPS))
