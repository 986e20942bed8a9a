"""The KL to the reference policy, on a tiny LoRA DiT with non-zero adapters (a policy that has moved):

* GRPO's loss carries ``kl_beta`` times the KL: the gradient changes by exactly ``kl_beta`` times the KL's gradient;
* the held-out guard's KL is 0 with the adapters off (the reference itself) and positive with them on;
* the held-out KL and GRPO's training KL are one quantity: on the same trajectories they agree, so ``eval.max_kl``
  reads on the scale of the logged ``kl``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tessera.evaluation.generate import image_seed
from tessera.finetune.config import GRPOConfig, GuardConfig, LoraSettings, RolloutConfig
from tessera.finetune.heldout import HeldOut, kl_window
from tessera.finetune.methods.base import Chunk
from tessera.finetune.methods.policy_gradient import PolicyGradient
from tessera.finetune.policy import Reference, wrap_lora
from tessera.finetune.rollout import GaussianPolicy, model_fn_of, policy_output, sample_trajectories, step_kl
from tessera.trainer.diffusion.objectives import FlowObjectiveConfig, ObjectiveConfig
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.models import DiTConfig, build_model
from tessera.trainer.text_encoders import TextEmbedding

OBJ = ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(prediction="sample"))
LATENT, STEPS, TEXT = (3, 8, 8), 4, 16


class Words:
    """A deterministic stand-in text encoder: each prompt's tokens from its own seed."""

    def encode(self, prompts: list[str]) -> TextEmbedding:
        rows = [torch.randn(3, TEXT, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        return TextEmbedding(torch.stack(rows), torch.ones(len(prompts), 3, dtype=torch.bool))


def moved_policy():
    """A tiny LoRA DiT whose adapters are non-zero, as after some updates."""
    torch.manual_seed(0)
    base = build_model("dit", DiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2,
                                        text_dim=TEXT, base_size=2))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.1)
    pol = wrap_lora(base, LoraSettings(rank=2, alpha=4.0))
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pol


def grpo(kl_beta: float) -> PolicyGradient:
    rollout = RolloutConfig(steps=STEPS, cfg_scale=1.0, batch_size=4, batches_per_update=1)
    cfg = GRPOConfig(group_size=4, kl_beta=kl_beta, clip_range=0.2, train_cfg=False)  # first 3 of 4 steps
    return PolicyGradient(cfg, SimpleNamespace(rollout=rollout))


def context(pol, policy: GaussianPolicy):
    engine = SimpleNamespace(backward=lambda loss: loss.backward(), step=lambda: None)
    return SimpleNamespace(policy=policy, train_fn=model_fn_of(pol), ref_fn=model_fn_of, reference=Reference(pol),
                           engine=engine, generators=None)


def chunk(pol, policy: GaussianPolicy, prompts: list[str], seeds: list[int]) -> Chunk:
    cond = Words().encode(prompts)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    lat, logp = sample_trajectories(model_fn_of(pol), policy, cond, None, 1.0, gens, LATENT, "cpu")
    return Chunk(prompts, [f"k{i}" for i in range(len(prompts))], cond, None, lat, logp, lat[:, -1])


def grads(pol) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in pol.parameters() if p.requires_grad])


def test_grpo_gradient_carries_kl_beta_times_the_kl_gradient():
    pol = moved_policy()
    policy = GaussianPolicy(OBJ, STEPS, noise_level=0.7, image_shape=(1, *LATENT))
    c = chunk(pol, policy, ["a red cat", "a blue dog", "a red cat", "a blue dog"], [1, 2, 3, 4])
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    got = {}
    for beta in (0.0, 0.5):
        pol.zero_grad(set_to_none=True)
        logs = {"loss": [], "ratio_dev": [], "clipfrac": [], "approx_kl": [], "kl": []}
        grpo(beta)._train_chunk(context(pol, policy), 0, 0, c, adv, logs)
        got[beta] = grads(pol)
    assert not torch.allclose(got[0.5], got[0.0])
    # The KL's own gradient, summed over the trained steps as the method's backward calls accumulate it.
    pol.zero_grad(set_to_none=True)
    rows, ref = torch.arange(4), Reference(pol)
    for j in grpo(0.5).trained_steps(policy):
        idx = torch.full((4,), j)
        x = c.latents[rows, idx]
        mean, _ = policy.mean_std(policy_output(model_fn_of(pol), policy, x, idx, c.cond, None, 1.0), idx, x)
        with ref.model() as r:
            mean_ref, _ = policy.mean_std(policy_output(model_fn_of(r), policy, x, idx, c.cond, None, 1.0), idx, x)
        step_kl(policy, mean, mean_ref, idx).mean().backward()
    torch.testing.assert_close(got[0.5] - got[0.0], 0.5 * grads(pol), rtol=1e-4, atol=1e-7)


def guard(pol, **eval_kw) -> HeldOut:
    cfg = GuardConfig(seeds=2, **eval_kw)
    cfg.prompts = SimpleNamespace(load=lambda: ["a red cat", "a blue dog"])
    base = SimpleNamespace(sampler=SamplerConfig(name="euler", steps=STEPS), objective=OBJ, text_encoder=Words(),
                           size=(8, 8))
    rollout = RolloutConfig(steps=STEPS, cfg_scale=1.0, batch_size=4, noise_level=0.7)
    return HeldOut(cfg, base, rollout, None, None, "cpu", LATENT)


def test_heldout_kl_is_zero_for_the_reference_and_positive_for_a_moved_policy():
    pol = moved_policy()
    held = guard(pol)
    assert held.kl_steps == [0, 1, 2]  # every step but the nearly noise-free last one
    assert held.kl(pol, Reference(pol)) > 1e-6
    with pol.disable_adapter():
        assert held.kl(pol, Reference(pol)) == 0.0  # adapters off: the reference, to the bit


def test_heldout_kl_equals_grpos_training_kl_on_the_same_trajectories():
    pol = moved_policy()
    held = guard(pol)
    policy = held.sde
    seeds = held.seeds  # the held-out trajectories: same prompts, same per-image generators
    c = chunk(pol, policy, held.captions, seeds)
    logs = {"loss": [], "ratio_dev": [], "clipfrac": [], "approx_kl": [], "kl": []}
    method = grpo(0.04)
    assert method.trained_steps(policy) == held.kl_steps
    method._train_chunk(context(pol, policy), 0, 0, c, torch.zeros(len(seeds)), logs)
    training = sum(logs["kl"]) / len(logs["kl"])  # mean over (row, trained step), as the loop logs ``kl``
    assert held.kl(pol, Reference(pol)) == pytest.approx(training, rel=1e-5)
    assert seeds == [image_seed(0, p, s) for p in range(2) for s in range(2)]


def test_kl_window_defaults_and_explicit_steps():
    r = RolloutConfig(steps=10)
    assert kl_window(GuardConfig(), r) == (0, 9)
    assert kl_window(GuardConfig(), RolloutConfig(steps=10, sde_window=[2, 6])) == (2, 6)
    assert kl_window(GuardConfig(kl_steps=[0, 10]), r) == (0, 10)
    with pytest.raises(ValueError, match="kl_steps"):
        GuardConfig(kl_steps=[3, 3])
