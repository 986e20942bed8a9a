"""``rollout.group_noise`` (DanceGRPO): a GRPO group's images start from one x_T and differ by the policy's own
noise only, and their advantages are relative to their group, not to every image of their prompt."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tessera.config import ConfigError
from tessera.finetune.config import FinetuneJobConfig, GRPOConfig, MethodConfig, RolloutConfig
from tessera.finetune.loop import make_batch
from tessera.finetune.methods.base import sample_chunk
from tessera.finetune.methods.policy_gradient import PolicyGradient
from tessera.finetune.rollout import GaussianPolicy
from tessera.trainer.diffusion.objectives import FlowObjectiveConfig, ObjectiveConfig
from tessera.trainer.engine import sample_generators

LATENT = (3, 8, 8)


def context(group_noise: bool):
    """What ``sample_chunk`` reads: a flow SDE policy, a toy model, a reward of the image mean."""
    obj = ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(prediction="sample"))
    return SimpleNamespace(
        cfg=SimpleNamespace(rollout=RolloutConfig(cfg_scale=1.0, group_noise=group_noise)),
        condition=lambda prompts, scale: (None, None),
        sample_fn=lambda x, t, c: torch.tanh(x) * 0.5,
        policy=GaussianPolicy(obj, 4, noise_level=0.7, image_shape=(1, *LATENT), window=[0, 2]),
        generators=lambda update, keys: sample_generators(0, update, list(keys)),
        latent_shape=LATENT, device="cpu",
        autoencoder=SimpleNamespace(decode=lambda z: z),
        reward=lambda images, prompts: images.mean((1, 2, 3)).double())


def test_a_group_starts_from_one_x_t_and_differs_by_the_policys_noise():
    batch = make_batch(["a cat", "a dog"], update=3, seed=0, per_rank=8, world=1, rank=0, group=4)
    assert batch.groups == ["u3/g0"] * 4 + ["u3/g1"] * 4
    c = sample_chunk(context(True), 3, batch.prompts, batch.keys, noise_keys=batch.groups)
    x_t, final = c.latents[:, 0], c.latents[:, -1]
    assert all(torch.equal(x_t[i], x_t[0]) for i in range(4)) and all(torch.equal(x_t[i], x_t[4]) for i in range(4, 8))
    assert not torch.equal(x_t[0], x_t[4])
    assert len({final[i].sum().item() for i in range(8)}) == 8  # the SDE steps drew each image's own noise
    # Without it every image draws its own x_T (the default, and what the other methods do).
    c = sample_chunk(context(False), 3, batch.prompts, batch.keys)
    assert len({c.latents[i, 0].sum().item() for i in range(8)}) == 8


def method(group_noise: bool) -> PolicyGradient:
    job = SimpleNamespace(rollout=RolloutConfig(steps=4, batch_size=4, batches_per_update=2, group_noise=group_noise))
    return PolicyGradient(GRPOConfig(group_size=4, global_std=False), job)


def test_with_group_noise_advantages_are_relative_to_the_group():
    # Two groups of one prompt (drawn twice): their x_T differ, so each is its own baseline.
    batch = SimpleNamespace(prompts=["a cat"] * 8, groups=["u0/g0"] * 4 + ["u0/g1"] * 4)
    r = np.array([0.0, 0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 1.0])
    by_group = method(True).advantages(batch, r)
    assert by_group[:4] == pytest.approx(by_group[4:])  # each group centred on its own mean
    assert abs(by_group[:4].sum()) < 1e-9 and abs(by_group[4:].sum()) < 1e-9
    by_prompt = method(False).advantages(batch, r)
    assert (by_prompt[:4] < 0).all() and (by_prompt[4:] > 0).all()


def test_group_noise_is_refused_without_group_advantages():
    cfg = FinetuneJobConfig(checkpoint="x", method=MethodConfig(name="ddpo"), rollout=RolloutConfig(group_noise=True))
    with pytest.raises(ConfigError, match="rollout.group_noise"):
        cfg.check()
