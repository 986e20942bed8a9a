"""Objective math: noising formulas, targets, timestep conventions, t distributions, EDM identities."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.config import from_dict
from tessera.trainer.diffusion import schedules
from tessera.trainer.diffusion.objectives import (
    OBJECTIVES,
    DDPMObjective,
    DDPMObjectiveConfig,
    EDMObjective,
    EDMObjectiveConfig,
    FlowObjective,
    FlowObjectiveConfig,
    ObjectiveConfig,
    build_objective,
)
from tessera.trainer.diffusion.schedules import BetaScheduleConfig
from tessera.trainer.diffusion.weighting import edm_weight, min_snr_weight


def _x0(shape=(4, 4, 8, 8), seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Recorder:
    """A model_fn that returns a fixed function of its inputs and records what it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, timestep, cond):
        self.calls.append((x, timestep, cond))
        return self.fn(x, timestep)


def test_registry_and_config_build():
    assert OBJECTIVES.names() == ["ddpm", "edm", "flow"]
    cfg = from_dict(ObjectiveConfig, {"name": "ddpm", "ddpm": {"prediction": "v", "min_snr_gamma": 5.0,
                                                               "schedule": {"schedule": "scaled_linear"}}})
    obj = build_objective(cfg)
    assert isinstance(obj, DDPMObjective) and obj.cfg.prediction == "v"
    with pytest.raises(ValueError):
        BetaScheduleConfig(beta_start=0.1, beta_end=0.01)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_ddpm_noise_target_and_oracle_loss(pred):
    obj = DDPMObjective(DDPMObjectiveConfig(prediction=pred))
    x0, eps = _x0(seed=0), _x0(seed=1)
    t = torch.tensor([0, 10, 500, 999])
    ab = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = obj.noise(x0, eps, t)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    want = {"eps": eps, "v": v, "x0": x0}[pred]
    torch.testing.assert_close(obj.target(x0, eps, t), want)
    # v-parameterization identities: x0 = a x_t - s v and eps = a v + s x_t.
    torch.testing.assert_close(ab.sqrt() * x_t - (1 - ab).sqrt() * v, x0)
    torch.testing.assert_close(ab.sqrt() * v + (1 - ab).sqrt() * x_t, eps)

    # An oracle that knows x0 predicts the target exactly, so the loss is ~0; check the timestep contract.
    def oracle(x, timestep):
        tt = timestep.long()
        a = obj.alphas_cumprod[tt].view(-1, 1, 1, 1).sqrt()
        s = (1 - obj.alphas_cumprod[tt]).view(-1, 1, 1, 1).sqrt()
        e = (x - a * x0) / s
        return {"eps": e, "v": a * e - s * x0, "x0": x0}[pred]

    model = Recorder(oracle)
    loss, t_log = obj.loss(model, x0, "cond", torch.Generator().manual_seed(3))
    assert loss.shape == (4,) and t_log.shape == (4,)
    assert loss.max() < 1e-10
    _, timestep, cond = model.calls[0]
    assert cond == "cond" and timestep.dtype == torch.float32 and timestep.shape == (4,)
    assert torch.equal(timestep, timestep.round()) and 0 <= timestep.min() and timestep.max() <= 999
    torch.testing.assert_close(t_log, timestep / 999)


def test_ddpm_loss_deterministic_and_min_snr_weighted():
    x0 = _x0(dtype=torch.float32)
    zero = Recorder(lambda x, t: torch.zeros_like(x))
    plain = DDPMObjective(DDPMObjectiveConfig(prediction="v"))
    weighted = DDPMObjective(DDPMObjectiveConfig(prediction="v", min_snr_gamma=5.0))
    l1, t1 = plain.loss(zero, x0, None, torch.Generator().manual_seed(7))
    l2, t2 = plain.loss(zero, x0, None, torch.Generator().manual_seed(7))
    assert torch.equal(l1, l2) and torch.equal(t1, t2)
    lw, tw = weighted.loss(zero, x0, None, torch.Generator().manual_seed(7))
    assert torch.equal(tw, t1)
    snr = plain.alphas_cumprod[(t1 * 999).round().long()]
    snr = snr / (1 - snr)
    torch.testing.assert_close(lw, l1 * (torch.clamp(snr, max=5.0) / (snr + 1)).float())


def test_min_snr_weights_closed_form():
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 20.0, 1e4], dtype=torch.float64)
    g = 5.0
    m = torch.minimum(snr, torch.full_like(snr, g))
    torch.testing.assert_close(min_snr_weight(snr, g, "x0"), m)
    torch.testing.assert_close(min_snr_weight(snr[1:], g, "eps"), m[1:] / snr[1:])
    torch.testing.assert_close(min_snr_weight(snr, g, "v"), m / (snr + 1))
    assert min_snr_weight(snr, g, "eps")[0] == 1.0  # finite at the zero-terminal-SNR step
    with pytest.raises(ValueError):
        min_snr_weight(snr, g, "flow")


def test_flow_noise_target_and_timestep():
    obj = FlowObjective(FlowObjectiveConfig(t_sampling="uniform"))
    x0, eps = _x0(seed=0), _x0(seed=1)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    x_t = obj.noise(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], eps[3])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(obj.target(x0, eps), eps - x0)
    model = Recorder(lambda x, ts: torch.zeros_like(x))
    loss, t_log = obj.loss(model, x0, None, torch.Generator().manual_seed(0))
    _, timestep, _ = model.calls[0]
    torch.testing.assert_close(timestep, t_log * 1000)
    # With a zero prediction, the loss is |eps - x0|^2 for the same draws.
    assert loss.shape == (4,) and torch.all(loss > 0.5)


def test_flow_t_distributions():
    n, g = 200_000, torch.Generator().manual_seed(0)
    u = FlowObjective(FlowObjectiveConfig(t_sampling="uniform")).sample_t(n, (1, 4, 32, 32), g, "cpu")
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    ln = FlowObjective(FlowObjectiveConfig(t_sampling="logit_normal", logit_mean=0.5, logit_std=1.5))
    t = ln.sample_t(n, (1, 4, 32, 32), g, "cpu")
    z = torch.logit(t)
    assert abs(z.mean() - 0.5) < 0.02 and abs(z.std() - 1.5) < 0.02
    assert t.min() > 0 and t.max() < 1
    # Static shift 3 moves the median of uniform t from 0.5 to 3*0.5/(1+2*0.5) = 0.75.
    sh = FlowObjective(FlowObjectiveConfig(t_sampling="uniform", shift=3.0)).sample_t(n, (1, 4, 32, 32), g, "cpu")
    assert abs(sh.median() - 0.75) < 0.005
    # Resolution-dependent shift: 8x8 latents, patch 2 -> 16 tokens; median = e^mu / (e^mu + 1).
    dyn = FlowObjective(FlowObjectiveConfig(t_sampling="uniform", dynamic_shift=True, patch_size=2))
    mu = schedules.calculate_shift(16)
    t = dyn.sample_t(n, (1, 4, 8, 8), g, "cpu")
    assert abs(t.median() - math.exp(mu) / (math.exp(mu) + 1)) < 0.005
    big = dyn.sample_t(n, (1, 4, 128, 128), g, "cpu")
    assert big.median() > t.median()  # more tokens -> more noise


def test_flow_uniform_mixture_matches_its_cdf_and_keeps_plain_draws():
    n = 200_000
    cfg = dict(t_sampling="logit_normal", logit_mean=1.5, logit_std=1.0)
    draw = lambda **kw: FlowObjective(FlowObjectiveConfig(**cfg, **kw)).sample_t(  # noqa: E731
        n, (1, 3, 32, 32), torch.Generator().manual_seed(1), "cpu")
    plain, mixed = draw(), draw(uniform_mix=0.25)
    assert torch.equal(plain, draw(uniform_mix=0.0))  # no mixture: the same draws as before the option existed
    assert mixed.min() >= 0 and mixed.max() < 1
    # Empirical CDF against p x + (1 - p) Phi((logit x - m) / s), at points where the two components differ most.
    for x in (0.1, 0.3, 0.5, 0.8, 0.95):
        phi = 0.5 * (1 + math.erf((math.log(x / (1 - x)) - 1.5) / math.sqrt(2)))
        assert abs(float((mixed <= x).double().mean()) - (0.25 * x + 0.75 * phi)) < 0.004, x
    # The low-noise end the plain logit-normal all but skips gets the mixture's uniform share.
    assert float((plain < 0.2).double().mean()) < 0.005 and float((mixed < 0.2).double().mean()) > 0.05
    with pytest.raises(ValueError, match="uniform_mix"):
        FlowObjectiveConfig(uniform_mix=1.0)


def test_edm_preconditioning_identities():
    obj = EDMObjective(EDMObjectiveConfig(sigma_data=0.5))
    x0, eps = _x0(seed=0), _x0(seed=1)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = obj.precondition(sigma)
    x = obj.noise(x0, eps, sigma)
    torch.testing.assert_close(x, x0 + sigma.view(-1, 1, 1, 1) * eps)
    f = _x0(seed=2)
    d = obj.denoise(lambda xi, ts, c: f, x, sigma, None)
    b = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(d, b(c_skip) * x + b(c_out) * f)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # c_in normalizes the input to unit variance when x0 has std sigma_data.
    torch.testing.assert_close(c_in**2 * (0.5**2 + sigma**2), torch.ones_like(sigma))
    # lambda(sigma) * c_out^2 == 1, so the F-space loss equals the weighted denoiser loss.
    torch.testing.assert_close(edm_weight(sigma, 0.5) * c_out**2, torch.ones_like(sigma))
    lhs = edm_weight(sigma, 0.5) * (d - x0).pow(2).flatten(1).mean(1)
    rhs = (f - obj.target(x0, eps, sigma)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)
    # The F-space target makes the denoiser exact.
    d_star = obj.denoise(lambda xi, ts, c: obj.target(x0, eps, sigma), x, sigma, None)
    torch.testing.assert_close(d_star, x0)


def test_edm_loss_sigma_distribution_and_timestep():
    obj = EDMObjective(EDMObjectiveConfig(p_mean=-1.2, p_std=1.2))
    ln_sigma = obj.sample_sigma(200_000, torch.Generator().manual_seed(0), "cpu").log()
    assert abs(ln_sigma.mean() + 1.2) < 0.02 and abs(ln_sigma.std() - 1.2) < 0.02
    model = Recorder(lambda x, ts: torch.zeros_like(x))
    x0 = _x0(dtype=torch.float32)
    loss, t_log = obj.loss(model, x0, None, torch.Generator().manual_seed(1))
    x_in, timestep, _ = model.calls[0]
    sigma = (4 * timestep.double()).exp()  # timestep is c_noise = ln(sigma)/4
    torch.testing.assert_close(t_log, (sigma**2 / (sigma**2 + 0.25)).float())
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss2, _ = obj.loss(model, x0, None, torch.Generator().manual_seed(1))
    assert torch.equal(loss, loss2)
