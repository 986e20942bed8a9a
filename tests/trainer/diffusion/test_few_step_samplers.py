"""The few-step samplers of distilled students: ``lcm`` against diffusers' LCMScheduler and FlowMatchLCMScheduler
(timesteps exactly, whole seeded chains within 1e-5), ``euler_uniform``'s grid (FLUX's, nested under halving), and
the shared (alpha, sigma) process every objective and prediction type maps onto."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchLCMScheduler, LCMScheduler

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjectiveConfig, ObjectiveConfig
from tessera.trainer.diffusion.process import CLEAN, Process
from tessera.trainer.diffusion.sampling import SamplerConfig, build_sampler, sample
from tessera.trainer.diffusion.samplers import FlowEulerUniformSampler, LCMSampler
from tessera.trainer.diffusion.samplers.euler_uniform import uniform_flow_sigmas
from tessera.trainer.diffusion.schedules import BetaScheduleConfig

PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _fake_model(x, t, cond=None):
    """A deterministic, timestep-dependent stand-in for a network."""
    return torch.tanh(x * 0.7 + (t.view(-1, 1, 1, 1) / 1000.0) - 0.2)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_matches_diffusers_lcm_scheduler(pred, steps):
    cfg = DDPMObjectiveConfig(schedule=BetaScheduleConfig(schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012), prediction=pred)
    ours = LCMSampler(cfg, origin_steps=50)
    ref = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=PRED[pred],
                       original_inference_steps=50, timestep_scaling=10.0)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert [int(t) for t in ours.timesteps] == ref.timesteps.tolist()
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ours, x_ref = x0.clone(), x0.clone()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        x_ours = ours.step(_fake_model(x_ours, torch.full((2,), float(t_ours))), t_ours, x_ours, generator=g_ours)
        x_ref = ref.step(_fake_model(x_ref, torch.full((2,), float(t_ref))), t_ref, x_ref, generator=g_ref).prev_sample
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_lcm_matches_diffusers_flow_match_lcm_scheduler(steps):
    cfg = FlowObjectiveConfig(prediction="velocity", shift=3.0)
    ours = LCMSampler(cfg, origin_steps=50)
    ours.set_timesteps(steps)
    ref = FlowMatchLCMScheduler(shift=3.0)
    # diffusers shifts the sigmas it is given: hand it the unshifted grid and compare the result with ours.
    unshifted = ours.times / (3.0 - 2.0 * ours.times)  # inverse of s = 3u / (1 + 2u)
    ref.set_timesteps(sigmas=unshifted.numpy().tolist())
    torch.testing.assert_close(ref.sigmas[:-1].double(), ours.times, rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        x_ours = ours.step(_fake_model(x_ours, torch.full((2,), float(t_ours))), t_ours, x_ours, generator=g_ours)
        x_ref = ref.step(_fake_model(x_ref, torch.full((2,), float(t_ref))), t_ref, x_ref, generator=g_ref).prev_sample
    # Only the boundary scaling differs: c_skip(t) <= 6e-6 at the grid's smallest t = 0.02 (timestep 20, x 10).
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-4)


def test_one_lcm_step_is_the_consistency_function_and_uses_no_noise():
    cfg = FlowObjectiveConfig(prediction="sample")
    s = build_sampler(SamplerConfig(name="lcm", steps=1, cfg_scale=1.0), ObjectiveConfig(name="flow", flow=cfg))
    s.set_timesteps(1)
    x = torch.randn(1, 3, 4, 4)
    out = torch.randn(1, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.allclose(s.step(out, s.timesteps[0], x, generator=g), out, atol=1e-12)  # t = 1: f = x0_hat
    assert torch.equal(g.get_state(), state)


def test_euler_uniform_grid_is_flux_s_and_nested_under_halving():
    cfg = FlowObjectiveConfig(shift=1.0)
    assert uniform_flow_sigmas(cfg, 4, None).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = FlowObjectiveConfig(shift=3.0)
    g8, g4 = uniform_flow_sigmas(shifted, 8, None), uniform_flow_sigmas(shifted, 4, None)
    assert torch.equal(g8[::2], g4)
    s = FlowEulerUniformSampler(FlowObjectiveConfig(prediction="velocity"))
    # straight paths: a constant velocity is integrated exactly in any number of steps
    v = torch.randn(1, 3, 4, 4)
    x1 = torch.randn(1, 3, 4, 4)
    for n in (1, 2, 3):
        x = sample(lambda x, t, c: v, s, (1, 3, 4, 4), None, steps=n, generator=torch.Generator().manual_seed(0))
        x1 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x, x1 - v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,pred", [("ddpm", "eps"), ("ddpm", "v"), ("ddpm", "x0"), ("flow", "velocity"),
                                       ("flow", "sample")])
def test_process_recovers_x0_and_eps_from_each_prediction_type(name, pred):
    obj = ObjectiveConfig(name=name, **{name: (DDPMObjectiveConfig if name == "ddpm" else FlowObjectiveConfig)(
        prediction=pred)})
    p = Process(obj)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 3, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.tensor([10.0, 500.0, 990.0] if name == "ddpm" else [0.1, 0.5, 0.9], dtype=torch.float64)
    x = p.noise(x0, eps, t)
    a, s = p.alpha_sigma(t)
    torch.testing.assert_close(a**2 + s**2 if name == "ddpm" else a + s, torch.ones(3, dtype=torch.float64))
    out = p.output_for(x0, x, t)
    got_x0, got_eps = p.x0_eps(out, x, t)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    assert p.alpha_sigma(torch.tensor([float(CLEAN)]))[0].item() == 1.0 or name == "flow"
