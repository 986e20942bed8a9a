"""Samplers end to end: analytic targets via oracle denoisers, determinism, any resolution, CFG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.trainer.diffusion.guidance import cat_cond, guided_output
from tessera.trainer.diffusion.objectives import (
    DDPMObjectiveConfig,
    EDMObjective,
    EDMObjectiveConfig,
    FlowObjectiveConfig,
    ObjectiveConfig,
)
from tessera.trainer.diffusion.samplers import SAMPLERS, DDIMSampler, DDPMSampler, EDMHeunSampler, EulerDiscreteSampler
from tessera.trainer.diffusion.sampling import SamplerConfig, build_sampler, sample
from tessera.trainer.diffusion.schedules import BetaScheduleConfig, alphas_cumprod

# (sampler config, objective config, steps) covering every sampler and every prediction type. Steps are
# what it takes to get the std of Gaussian data within 0.02: first-order samplers (DDPM, DDIM, Euler)
# converge as O(1/n) (DDIM at 50 steps: 0.469 of 0.5), DPM-Solver++(2M) and Heun as O(1/n^2).
CASES = {
    "ddpm-eps": (SamplerConfig(name="ddpm", timestep_spacing="leading"), ObjectiveConfig(name="ddpm"), 500),
    "ddim-v": (SamplerConfig(name="ddim"), ObjectiveConfig(name="ddpm", ddpm=DDPMObjectiveConfig(prediction="v")),
               200),
    "ddim-x0": (SamplerConfig(name="ddim"), ObjectiveConfig(name="ddpm", ddpm=DDPMObjectiveConfig(prediction="x0")),
                200),
    "dpmpp-eps": (SamplerConfig(name="dpmpp_2m"), ObjectiveConfig(name="ddpm"), 25),
    "dpmpp-flow": (SamplerConfig(name="dpmpp_2m"), ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(shift=3.0)),
                   25),
    "dpmpp-flow-dyn": (SamplerConfig(name="dpmpp_2m"),
                       ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(dynamic_shift=True)), 25),
    "euler-flow": (SamplerConfig(name="euler"), ObjectiveConfig(name="flow"), 100),
    "euler-flow-dyn": (SamplerConfig(name="euler"),
                       ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(dynamic_shift=True)), 100),
    "euler-discrete-eps": (SamplerConfig(name="euler_discrete", timestep_spacing="linspace"),
                           ObjectiveConfig(name="ddpm"), 200),
    "edm-heun": (SamplerConfig(name="edm_heun"), ObjectiveConfig(name="edm"), 32),
}


def gaussian_oracle(objective: ObjectiveConfig, mu: torch.Tensor, std: float):
    """Exact network output for data x0 ~ N(mu, std^2 I) (std = 0: the single point mu), per objective.

    With x_t = a x0 + s eps, E[x0 | x_t] = mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu); the output is
    then converted to what the trained network would predict (eps | v | x0, velocity, or EDM's F).
    """
    if objective.name == "ddpm":
        ac = alphas_cumprod(objective.ddpm.schedule).double()
        table = ((1 - ac) / ac).sqrt().numpy()

    def model_fn(x_in, timestep, cond):
        x_in, t = x_in.double(), float(timestep[0])
        if objective.name == "ddpm":  # x_in is the VP x_t; t may be fractional (euler_discrete)
            sig = float(np.interp(t, np.arange(len(table)), table))
            a = (1 / (1 + sig**2)) ** 0.5
            s = (1 - a * a) ** 0.5
            x = x_in
        elif objective.name == "flow":
            s = t / objective.flow.timestep_scale
            a, x = 1 - s, x_in
        else:
            s = float(np.exp(4 * t))  # c_noise = ln(sigma) / 4
            _, _, c_in, _ = EDMObjective(objective.edm).precondition(torch.tensor(s, dtype=torch.float64))
            a, x = 1.0, x_in / float(c_in)
        x0 = mu + a * std**2 / (a * a * std**2 + s * s) * (x - a * mu)
        eps = (x - a * x0) / s
        if objective.name == "flow":
            return (eps - x0).float()
        if objective.name == "edm":
            c_skip, c_out, _, _ = EDMObjective(objective.edm).precondition(torch.tensor(s, dtype=torch.float64))
            return ((x0 - float(c_skip) * x) / float(c_out)).float()
        pred = objective.ddpm.prediction
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred].float()

    return model_fn


@pytest.mark.parametrize("case", list(CASES))
def test_single_point_data_is_recovered(case):
    scfg, ocfg, steps = CASES[case]
    c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double() * 0.5
    sampler = build_sampler(scfg, ocfg)
    x = sample(gaussian_oracle(ocfg, c, 0.0), sampler, (2, 4, 8, 8), None, steps=min(steps, 20),
               generator=torch.Generator().manual_seed(1))
    assert (x.double() - c).abs().max() < 1e-3, case


@pytest.mark.parametrize("case", list(CASES))
def test_gaussian_data_moments_are_recovered(case):
    # The sampler must carry the right amount of noise into the result: mean and std of N(0.3, 0.5^2).
    scfg, ocfg, steps = CASES[case]
    sampler = build_sampler(scfg, ocfg)
    x = sample(gaussian_oracle(ocfg, torch.tensor(0.3, dtype=torch.float64), 0.5), sampler, (8, 4, 16, 16), None,
               steps=steps, generator=torch.Generator().manual_seed(2))
    assert abs(float(x.mean()) - 0.3) < 0.02, (case, float(x.mean()))
    assert abs(float(x.std()) - 0.5) < 0.02, (case, float(x.std()))


class TinyModel(torch.nn.Module):
    """A conv net conditioned on the mean of text tokens: any H x W, cond-dependent output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)
        self.calls: list[int] = []

    def forward(self, x, timestep, cond):
        self.calls.append(x.shape[0])
        h = cond["hidden"] * cond["mask"][..., None]
        c = self.proj(h.sum(1) / cond["mask"].sum(1, keepdim=True))  # (B, 4)
        return self.conv(x) * 0.1 + c[:, :, None, None] + 1e-3 * timestep[:, None, None, None]


def _cond(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden": torch.randn(b, 5, 8, generator=g), "mask": torch.ones(b, 5)}


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_deterministic_any_resolution(name):
    obj = {"euler": "flow", "euler_uniform": "flow", "edm_heun": "edm"}.get(name, "ddpm")
    sampler = build_sampler(SamplerConfig(name=name, eta=1.0), ObjectiveConfig(name=obj))  # ddim: stochastic
    model = TinyModel()
    for shape in [(2, 4, 8, 8), (2, 4, 8, 16), (2, 4, 16, 8)]:
        kw = dict(cond=_cond(2), uncond=_cond(1, seed=9), cfg_scale=3.0, steps=4)
        a = sample(model, sampler, shape, generator=torch.Generator().manual_seed(3), **kw)
        b = sample(model, sampler, shape, generator=torch.Generator().manual_seed(3), **kw)
        c = sample(model, sampler, shape, generator=torch.Generator().manual_seed(4), **kw)
        assert a.shape == shape and torch.isfinite(a).all()
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_scale_one_equals_no_guidance_and_batches_one_forward():
    sampler = build_sampler(SamplerConfig(name="euler"), ObjectiveConfig(name="flow"))
    model = TinyModel()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    plain = sample(model, sampler, (2, 4, 8, 8), _cond(2), None, steps=6, generator=g())
    one = sample(model, sampler, (2, 4, 8, 8), _cond(2), _cond(1, 9), cfg_scale=1.0, steps=6, generator=g())
    assert torch.equal(plain, one)
    model.calls.clear()
    guided = sample(model, sampler, (2, 4, 8, 8), _cond(2), _cond(1, 9), cfg_scale=4.0, steps=6, generator=g())
    assert model.calls == [4] * 6  # cond and uncond in one forward per step
    assert not torch.allclose(guided, plain)


def test_guided_output_is_extrapolation():
    model = TinyModel()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    cond, uncond = _cond(2), _cond(1, 9)
    out = guided_output(model, x, t, cond, cat_cond(cond, uncond), 7.5)
    c = model(x, t, cond)
    u = model(x, t, {k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
    assert (out - (u + 7.5 * (c - u))).abs().max() < 1e-5


def test_build_sampler_rejects_mismatched_objective():
    with pytest.raises(ValueError, match="samples 'ddpm'"):
        build_sampler(SamplerConfig(name="ddim"), ObjectiveConfig(name="flow"))
    with pytest.raises(ValueError, match="not edm"):
        build_sampler(SamplerConfig(name="dpmpp_2m"), ObjectiveConfig(name="edm"))
    with pytest.raises(KeyError, match="did you mean"):
        SAMPLERS.get("dpmpp2m")


def test_edm_heun_evaluations_and_schedule():
    s = EDMHeunSampler(EDMObjectiveConfig())
    s.set_timesteps(10)
    assert len(s.timesteps) == 19  # 2n - 1 network evaluations
    assert float(s.sigmas[0]) == pytest.approx(80.0) and float(s.sigmas[-2]) == pytest.approx(0.002)
    assert float(s.sigmas[-1]) == 0.0


def test_ddpm_family_strided_prev_timesteps():
    cfg = DDPMObjectiveConfig(schedule=BetaScheduleConfig(zero_terminal_snr=True), prediction="v")
    s = DDIMSampler(cfg, timestep_spacing="trailing")
    s.set_timesteps(7)  # 1000 / 7 is not an integer: the table's next entry is used
    ts = s.timesteps.tolist()
    assert ts[0] == 999 and [s.prev_timestep(t) for t in ts] == ts[1:] + [-1]
    d = DDPMSampler(cfg)
    d.set_timesteps(10)
    assert d.prev_timestep(0) == -1 and d.prev_timestep(900) == 800
    e = EulerDiscreteSampler(cfg)
    assert torch.isfinite(e.sigmas).all()


def test_cat_cond_structures():
    from dataclasses import dataclass

    @dataclass
    class Emb:
        hidden: torch.Tensor
        mask: torch.Tensor
        pooled: torch.Tensor | None = None

    c = Emb(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool), None)
    u = Emb(torch.zeros(1, 5, 8), torch.zeros(1, 5, dtype=torch.bool), None)
    both = cat_cond(c, u)
    assert isinstance(both, Emb) and both.hidden.shape == (6, 5, 8) and both.pooled is None
    assert torch.equal(both.hidden[3:], torch.zeros(3, 5, 8)) and not both.mask[3:].any()
    pair = cat_cond((torch.ones(2, 1), {"k": torch.ones(2, 3)}), (torch.zeros(2, 1), {"k": torch.zeros(1, 3)}))
    assert pair[0].shape == (4, 1) and pair[1]["k"].shape == (4, 3)
    with pytest.raises(ValueError):
        cat_cond({"a": torch.ones(1)}, {"b": torch.ones(1)})


@pytest.mark.parametrize("case", list(CASES))
def test_noise_level_is_one_scale_for_every_sampler(case):
    # Every sampler reports the flow time of the same signal-to-noise ratio: descending from ~1 toward 0 over its
    # table, and equal to sigma / (1 + sigma) of the noise-to-signal ratio the oracle model sees at that step.
    scfg, ocfg, _ = CASES[case]
    sampler = build_sampler(scfg, ocfg)
    sampler.set_timesteps(10, image_shape=(1, 4, 8, 8))
    levels = [sampler.noise_level(t) for t in sampler.timesteps]
    assert all(0.0 <= v <= 1.0 for v in levels)
    assert all(a >= b for a, b in zip(levels, levels[1:])) and levels[0] > 0.9 and levels[-1] < 0.3, levels
    t = sampler.timesteps[len(sampler.timesteps) // 2]
    if ocfg.name == "ddpm":
        ab = float(np.interp(float(t), np.arange(1000), alphas_cumprod(ocfg.ddpm.schedule).double().numpy()))
        sigma = ((1 - ab) / ab) ** 0.5
    elif ocfg.name == "flow":
        ft = float(t) / ocfg.flow.timestep_scale
        sigma = ft / (1 - ft)
    else:
        sigma = float(t)
    assert abs(sampler.noise_level(t) - sigma / (1 + sigma)) < 1e-3


def test_guidance_interval_guides_only_inside_it():
    scfg = SamplerConfig(name="euler", guidance_interval=[0.2, 0.7])
    sampler = build_sampler(scfg, ObjectiveConfig(name="flow"))
    model = TinyModel()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    kw = dict(cond=_cond(2), uncond=_cond(1, 9), cfg_scale=4.0, steps=10)
    every = sample(model, sampler, (2, 4, 8, 8), generator=g(), **kw)
    model.calls.clear()
    some = sample(model, sampler, (2, 4, 8, 8), generator=g(), guidance_interval=scfg.guidance_interval, **kw)
    # Flow times 1, 0.89, ..., 0.0; the steps at 0.67, 0.56, 0.44, 0.33 and 0.22 run cond + uncond (batch 4).
    inside = [0.2 <= float(t) / 1000 <= 0.7 for t in sampler.timesteps]
    assert sum(inside) == 5 and model.calls == [4 if i else 2 for i in inside]
    plain = sample(model, sampler, (2, 4, 8, 8), _cond(2), None, steps=10, generator=g())
    assert not torch.allclose(some, every) and not torch.allclose(some, plain)
    # An interval holding every step is full guidance; one holding none is the conditional model alone.
    whole = sample(model, sampler, (2, 4, 8, 8), generator=g(), guidance_interval=[0.0, 1.0], **kw)
    empty = sample(model, sampler, (2, 4, 8, 8), generator=g(), guidance_interval=[0.95, 0.99], **kw)
    assert torch.equal(whole, every) and torch.equal(empty, plain)


@pytest.mark.parametrize("bad", [[0.5, 0.2], [0.0, 1.5], [-0.1, 0.5], [0.3]])
def test_guidance_interval_is_validated(bad):
    with pytest.raises(ValueError, match="guidance_interval"):
        SamplerConfig(guidance_interval=bad)
