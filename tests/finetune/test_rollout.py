"""The shared sampler: each step's log-probability is the Gaussian density, the noise-free policy is exactly the
trainer's DDIM / flow Euler sampler, a window keeps the noise to its steps, and rows are independent."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.finetune.rollout import GaussianPolicy, sample_trajectories
from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjectiveConfig, ObjectiveConfig
from tessera.trainer.diffusion.samplers import DDIMSampler, FlowEulerSampler
from tessera.trainer.engine import sample_generators

SHAPE = (1, 3, 8, 8)


def objective(kind: str, prediction: str) -> ObjectiveConfig:
    if kind == "flow":
        return ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(prediction=prediction))
    return ObjectiveConfig(name="ddpm", ddpm=DDPMObjectiveConfig(prediction=prediction))


CASES = [("flow", "velocity"), ("flow", "sample"), ("ddpm", "eps"), ("ddpm", "x0"), ("ddpm", "v")]


@pytest.mark.parametrize("kind,prediction", CASES)
def test_step_log_prob_is_the_analytic_gaussian_density(kind, prediction):
    pol = GaussianPolicy(objective(kind, prediction), 5, eta=1.0, noise_level=0.7, image_shape=SHAPE)
    torch.manual_seed(0)
    x, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    idx = torch.tensor([0, 1, 3, 4])  # rows at different steps
    x_next, logp, mean, std = pol.step(out, idx, x, generators=sample_generators(0, 0, list("abcd")))
    assert torch.all(std > 0) and torch.all(std.flatten() == pol.std[idx].float())
    want = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double()).flatten(1).mean(1)
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    assert logp.dtype == torch.float32
    # Recomputing with the drawn x_next gives the same density bit for bit (the importance ratio's 1 at init).
    _, again, _, _ = pol.step(out, idx, x, prev=x_next)
    assert torch.equal(again, logp)


def test_noise_free_policy_is_the_trainers_ddim_and_flow_euler():
    torch.manual_seed(0)
    for kind, prediction in CASES:
        obj = objective(kind, prediction)
        ode = GaussianPolicy(obj, 6, eta=0.0, noise_level=0.0, image_shape=SHAPE)
        assert not ode.stochastic and ode.train_steps == []
        sub = getattr(obj, obj.name)
        ref = FlowEulerSampler(sub) if kind == "flow" else DDIMSampler(sub, eta=0.0, set_alpha_to_one=False)
        ref.set_timesteps(6, image_shape=SHAPE)
        x = torch.randn(2, 3, 8, 8)
        for i, t in enumerate(ref.timesteps):
            out = torch.randn(2, 3, 8, 8)
            idx = torch.full((2,), i)
            assert torch.allclose(ode.timestep(idx, "cpu"), torch.full((2,), float(t)))
            mine, logp, _, _ = ode.step(out, idx, x)
            theirs = ref.step(out, t, x)
            assert logp is None
            torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-5)
            x = theirs.float()


def test_flow_sde_noise_follows_flow_grpo():
    pol = GaussianPolicy(objective("flow", "velocity"), 4, noise_level=0.7, image_shape=SHAPE)
    s = FlowEulerSampler(FlowObjectiveConfig())
    s.set_timesteps(4, image_shape=SHAPE)
    sig = s.sigmas.tolist()
    for i in range(4):
        denom = 1 - (sig[1] if sig[i] == 1 else sig[i])
        want = 0.7 * math.sqrt(sig[i] / denom) * math.sqrt(sig[i] - sig[i + 1])  # sigma_t sqrt(-dt)
        assert float(pol.std[i]) == pytest.approx(want, rel=1e-12)


def test_sde_window_keeps_noise_and_log_probs_to_its_steps():
    pol = GaussianPolicy(objective("flow", "sample"), 6, noise_level=0.7, image_shape=SHAPE, window=[1, 4])
    assert pol.train_steps == [1, 2, 3]

    def model_fn(x, t, c):
        return torch.tanh(x) * 0.5

    gens = sample_generators(0, 0, ["a", "b"])
    lat, logp = sample_trajectories(model_fn, pol, None, None, 1.0, gens, (3, 8, 8), "cpu")
    assert lat.shape == (2, 7, 3, 8, 8) and logp.shape == (2, 6)
    assert torch.all(logp[:, [0, 4, 5]] == 0) and torch.all(logp[:, 1:4] != 0)
    # Each row is a function of its own generator only: sampled alone, row "b" is the same.
    lat_b, _ = sample_trajectories(model_fn, pol, None, None, 1.0, sample_generators(0, 0, ["b"]), (3, 8, 8), "cpu")
    assert torch.equal(lat_b[0], lat[1])


def test_edm_models_are_refused():
    with pytest.raises(ValueError, match="DDPM and flow"):
        GaussianPolicy(ObjectiveConfig(name="edm"), 4)
