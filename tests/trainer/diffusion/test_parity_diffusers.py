"""Parity with diffusers' schedulers: schedule tables and single ``step`` outputs on the same inputs.

Tolerance: tables (betas, alphas_cumprod, DDPM sigmas) are compared bitwise; timesteps exactly; sigma
tables and DDPM/DDIM step outputs with atol = rtol = 1e-6 elementwise. Multistep chains (DPM-Solver,
Euler, flow) use rtol = 1e-6 and atol = 1e-6 * max(1, max|ref|): an arbitrary fake "eps" model at high
noise makes x0_hat ~ 400, and float64 cancellation then leaves ~4e-6 absolute (1e-8 relative to that scale)
on elements near zero.
Steps run on float64 inputs with diffusers' float32 tables upcast to float64 after the table check
(same values): diffusers otherwise does the step arithmetic in float32 scalars, whose rounding of
1 - alpha_bar near t = 0 alone is ~1e-5 relative, while we do it in float64. (DPM-Solver, Euler and flow
still round the incoming sample to float32 inside diffusers' ``step``; that costs ~1e-7.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjectiveConfig
from tessera.trainer.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerDiscreteSampler,
    FlowEulerSampler,
)
from tessera.trainer.diffusion.schedules import BetaScheduleConfig, alphas_cumprod, ddpm_sigmas, make_betas

TOL = dict(rtol=1e-6, atol=1e-6)
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion's
    "squaredcos_cap_v2": (1e-4, 0.02),
}


def _cfgs(schedule: str, zero_snr: bool, pred: str = "eps"):
    b0, b1 = SCHEDULES[schedule]
    ref_kw = dict(beta_schedule=schedule, beta_start=b0, beta_end=b1, rescale_betas_zero_snr=zero_snr,
                  prediction_type=PRED[pred])
    ours = DDPMObjectiveConfig(
        schedule=BetaScheduleConfig(schedule=schedule, beta_start=b0, beta_end=b1, zero_terminal_snr=zero_snr),
        prediction=pred,
    )
    return ref_kw, ours


def _inputs(seed: int, dtype=torch.float64, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def _fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth deterministic stand-in for a network, so multistep histories differ per step."""
    return torch.tanh(0.7 * x) + 0.01 * float(t) ** 0.5


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_beta_tables_bitwise(schedule, zero_snr):
    ref_kw, ours = _cfgs(schedule, zero_snr)
    ref = DDPMScheduler(**ref_kw)
    assert torch.equal(make_betas(ours.schedule), ref.betas)
    assert torch.equal(alphas_cumprod(ours.schedule), ref.alphas_cumprod)
    if zero_snr:
        assert alphas_cumprod(ours.schedule)[-1] == 0.0


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_ddpm_timesteps(spacing):
    ref_kw, ours = _cfgs("linear", False)
    for n in (1, 7, 50, 1000):
        ref = DDPMScheduler(**ref_kw, timestep_spacing=spacing)
        ref.set_timesteps(n)
        s = DDPMSampler(ours, timestep_spacing=spacing)
        s.set_timesteps(n)
        assert torch.equal(s.timesteps, ref.timesteps), (spacing, n)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_step(schedule, zero_snr, pred):
    ref_kw, ours = _cfgs(schedule, zero_snr, pred)
    ref = DDPMScheduler(**ref_kw, clip_sample=False)
    ref.set_timesteps(50)
    ref.alphas_cumprod, ref.one = ref.alphas_cumprod.double(), ref.one.double()
    s = DDPMSampler(ours)
    s.set_timesteps(50)
    x, out = _inputs(0)
    for t in ref.timesteps[[0, 10, 25, 48, 49]]:  # 49 is t = 0: no noise
        want = ref.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        got = s.step(out, t, x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize(
    "schedule,zero_snr", [("scaled_linear", False), ("linear", True), ("squaredcos_cap_v2", False)]
)
def test_ddim_step(schedule, zero_snr, spacing, pred):
    ref_kw, ours = _cfgs(schedule, zero_snr, pred)
    ref = DDIMScheduler(**ref_kw, clip_sample=False, timestep_spacing=spacing)
    ref.set_timesteps(20)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    s = DDIMSampler(ours, eta=0.0, timestep_spacing=spacing)
    s.set_timesteps(20)
    assert torch.equal(s.timesteps, ref.timesteps)
    x, out = _inputs(1)
    # eps-prediction is undefined at SNR 0 (x0 = (x - eps) / 0, in diffusers too): compare the other steps.
    for t in [t for t in ref.timesteps if pred != "eps" or ref.alphas_cumprod[t] > 0]:
        want = ref.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(s.step(out, t, x), want, **TOL)


def _run_chain(ref, ours, x: torch.Tensor, n_steps: int):
    """Run both schedulers' full chains on the same fake model; compare every step's output."""
    ref.sigmas = ref.sigmas.double()
    x_ref, x_ours = x.clone(), x.clone()
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps, strict=True):
        x_in_ref = ref.scale_model_input(x_ref, t_ref) if hasattr(ref, "scale_model_input") else x_ref
        x_in, _ = ours.model_input(x_ours, t_ours)
        torch.testing.assert_close(x_in, x_in_ref, rtol=1e-6, atol=1e-6 * max(1.0, float(x_in_ref.abs().max())))
        out = _fake_model(x_in_ref, t_ref)
        x_ref = ref.step(out, t_ref, x_ref).prev_sample
        x_ours = ours.step(out, t_ours, x_ours)
        scale = max(1.0, float(x_ref.abs().max()))
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-6, atol=1e-6 * scale)
    return x_ours


@pytest.mark.parametrize(
    "schedule,pred,zero_snr", [("linear", "eps", False), ("scaled_linear", "v", False), ("scaled_linear", "v", True),
                               ("squaredcos_cap_v2", "x0", False)]
)
def test_dpm_solver_pp_2m_chain(schedule, pred, zero_snr):
    ref_kw, ours = _cfgs(schedule, zero_snr, pred)
    for n in (5, 12, 20):  # 20 >= 15: diffusers keeps order 2 up to the last (sigma = 0) step
        ref = DPMSolverMultistepScheduler(**ref_kw, algorithm_type="dpmsolver++", solver_order=2,
                                          lower_order_final=True)
        ref.set_timesteps(n)
        s = DPMSolverSampler(ours)
        s.set_timesteps(n)
        assert torch.equal(s.timesteps, ref.timesteps)
        torch.testing.assert_close(s.sigmas, ref.sigmas.double(), rtol=0, atol=0)
        _run_chain(ref, s, _inputs(2, torch.float64)[0], n)


@pytest.mark.parametrize("shift,dynamic", [(1.0, False), (3.0, False), (1.0, True)])
def test_dpm_solver_pp_2m_flow_chain(shift, dynamic):
    ref = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                      use_dynamic_shifting=dynamic, algorithm_type="dpmsolver++", solver_order=2)
    cfg = FlowObjectiveConfig(shift=shift, dynamic_shift=dynamic)
    shape = (1, 4, 96, 64)
    ref.set_timesteps(10, mu=FlowEulerSampler(cfg).mu(shape) if dynamic else None)
    s = DPMSolverSampler(cfg)
    s.set_timesteps(10, image_shape=shape)
    torch.testing.assert_close(s.sigmas, ref.sigmas.double(), **TOL)
    assert torch.equal(s.timesteps.long(), ref.timesteps)  # diffusers truncates t * 1000 to int; we keep it
    _run_chain(ref, s, _inputs(3, torch.float64)[0], 10)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("schedule,pred", [("scaled_linear", "eps"), ("linear", "v"), ("squaredcos_cap_v2", "eps")])
def test_euler_discrete(schedule, pred, spacing):
    ref_kw, ours = _cfgs(schedule, False, pred)
    ref = EulerDiscreteScheduler(**ref_kw, timestep_spacing=spacing)
    ref.set_timesteps(25)
    s = EulerDiscreteSampler(ours, timestep_spacing=spacing)
    s.set_timesteps(25)
    torch.testing.assert_close(s.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(s.sigmas, ref.sigmas.double(), rtol=0, atol=0)
    assert s.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    x = _inputs(4, torch.float64)[0] * s.init_noise_sigma
    _run_chain(ref, s, x, 25)


@pytest.mark.parametrize("shift,dynamic", [(1.0, False), (3.0, False), (1.0, True)])
def test_flow_match_euler(shift, dynamic):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
    cfg = FlowObjectiveConfig(shift=shift, dynamic_shift=dynamic, patch_size=2)
    s = FlowEulerSampler(cfg)
    for n, shape in [(1, (1, 4, 8, 8)), (10, (1, 4, 64, 64)), (28, (1, 16, 128, 96))]:
        mu = s.mu(shape) if dynamic else None
        ref.set_timesteps(n, mu=mu)
        s.set_timesteps(n, image_shape=shape)
        torch.testing.assert_close(s.sigmas, ref.sigmas.double(), **TOL)
        torch.testing.assert_close(s.timesteps, ref.timesteps.double(), rtol=1e-6, atol=1e-4)  # t*1000 in float32
        x = _inputs(5, torch.float64)[0]
        _run_chain(ref, s, x, n)


def test_flow_dynamic_shift_mu_is_flux_calculate_shift():
    # FLUX/SD3 pipelines: mu linear in the token count, 0.5 at 256 tokens and 1.15 at 4096.
    s = FlowEulerSampler(FlowObjectiveConfig(dynamic_shift=True, patch_size=2))
    assert s.mu((1, 16, 32, 32)) == pytest.approx(0.5, abs=1e-12)  # 16 * 16 = 256 tokens
    assert s.mu((1, 16, 128, 128)) == pytest.approx(1.15, abs=1e-12)  # 64 * 64 = 4096 tokens
    assert s.mu((1, 16, 128, 64)) == pytest.approx(0.5 + 0.65 * (2048 - 256) / 3840, abs=1e-12)


def test_ddpm_sigmas_match_euler_table():
    ref_kw, ours = _cfgs("scaled_linear", True)
    ref = EulerDiscreteScheduler(**ref_kw)
    table = ddpm_sigmas(alphas_cumprod(ours.schedule), zero_terminal_snr=True)
    assert torch.equal(table.flip(0), ref.sigmas[:-1])
    assert np.isfinite(table.numpy()).all()


def test_edm_karras_sigmas_and_preconditioning():
    from diffusers import EDMEulerScheduler

    from tessera.trainer.diffusion.objectives import EDMObjective, EDMObjectiveConfig
    from tessera.trainer.diffusion.samplers import EDMHeunSampler

    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    ref.set_timesteps(18)
    s = EDMHeunSampler(EDMObjectiveConfig(sigma_data=0.5), sigma_min=0.002, sigma_max=80.0, rho=7.0)
    s.set_timesteps(18)
    torch.testing.assert_close(s.sigmas, ref.sigmas.double(), **TOL)
    edm = EDMObjective(EDMObjectiveConfig(sigma_data=0.5))
    x, f = _inputs(6)
    for sigma in (0.002, 0.3, 1.0, 80.0):
        sig = torch.tensor([sigma], dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = edm.precondition(sig)
        torch.testing.assert_close(c_in * x, ref.precondition_inputs(x, sig), **TOL)
        torch.testing.assert_close(c_noise, ref.precondition_noise(sig), **TOL)
        torch.testing.assert_close(c_skip * x + c_out * f, ref.precondition_outputs(x, f, sig), **TOL)
