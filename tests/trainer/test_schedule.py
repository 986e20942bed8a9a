"""Learning-rate schedules and cadences as functions of samples seen, flow x-prediction, and the quickstart's
decay sizing."""

from __future__ import annotations

import pytest
import torch

from tessera.quickstart.run import decay_plan
from tessera.trainer.diffusion.objectives import FlowObjective, FlowObjectiveConfig, ObjectiveConfig, flow_velocity
from tessera.trainer.diffusion.sampling import SamplerConfig, build_sampler, sample
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig, build_ds_config
from tessera.trainer.schedule import crossed, lr_at


def test_wsd_warms_up_holds_then_decays_linearly():
    o = OptimConfig(lr=1e-3, schedule="wsd", warmup_samples=100, decay_start_samples=1000, decay_samples=500,
                    min_lr_ratio=0.1)
    assert lr_at(o, 50, 10**9) == pytest.approx(5e-4)
    assert lr_at(o, 100, 10**9) == lr_at(o, 1000, 10**9) == 1e-3
    assert lr_at(o, 1250, 10**9) == pytest.approx(1e-3 * (1 - 0.5 * 0.9))
    assert lr_at(o, 1500, 10**9) == lr_at(o, 10**9, 10**9) == pytest.approx(1e-4)
    assert lr_at(OptimConfig(lr=1e-3, schedule="wsd"), 10**9, 10**9) == 1e-3  # no decay planned: stable
    ds = build_ds_config(DeepSpeedConfig(), o, micro_batch=4, world_size=2, cuda=False)
    assert "scheduler" not in ds  # the loop sets the rate itself, from samples seen
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)


def test_constant_and_cosine_with_warmup():
    c = OptimConfig(lr=2e-3, warmup_samples=64)
    assert [lr_at(c, s, 1000) for s in (16, 32, 64, 500, 1000)] == [5e-4, 1e-3, 2e-3, 2e-3, 2e-3]
    cos = OptimConfig(lr=2e-3, warmup_samples=64, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cos, 32, 1064) == pytest.approx(1e-3)
    assert lr_at(cos, 64, 1064) == pytest.approx(2e-3)  # the peak, then half a cosine to the floor at the end
    assert lr_at(cos, 564, 1064) == pytest.approx(2e-4 + 0.5 * 1.8e-3)
    assert lr_at(cos, 1064, 1064) == lr_at(cos, 5000, 1064) == pytest.approx(2e-4)


def test_crossed_fires_once_per_multiple():
    fired = [s for s in range(8, 200, 8) if crossed(s, 8, 20)]
    assert fired == [24, 40, 64, 80, 104, 120, 144, 160, 184]
    assert not any(crossed(s, 8, 0) for s in range(8, 100, 8))  # 0: never
    assert crossed(16, 16, 16) and not crossed(15, 15, 16)


def test_x_prediction_converts_to_the_true_velocity():
    cfg = FlowObjectiveConfig(prediction="sample")
    obj = FlowObjective(cfg)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    x_t = obj.noise(x0, eps, t).float()
    v = flow_velocity(cfg, x0, x_t, t.float())  # a perfect x0 prediction gives v = eps - x0
    assert torch.allclose(v, eps - x0, atol=1e-5)
    # The loss of a perfect x0-predictor is 0; of a perfect velocity output under "velocity" too.
    loss, _ = obj.loss(lambda xt, ts, c: x0, x0, None, torch.Generator().manual_seed(0))
    assert loss.abs().max() < 1e-8
    # Near the clean end the loss caps the 1/t factor at 1/t_min; samplers use the exact factor.
    assert torch.allclose(flow_velocity(cfg, torch.zeros(1, 1), torch.ones(1, 1), 0.001), torch.full((1, 1), 20.0))
    assert torch.allclose(flow_velocity(cfg, torch.zeros(1, 1), torch.ones(1, 1), 0.001, exact=True),
                          torch.full((1, 1), 1000.0))
    assert flow_velocity(FlowObjectiveConfig(), x0, x_t, t) is x0  # "velocity": the output itself


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_samplers_land_on_an_x_prediction(sampler):
    """A model that always predicts the same clean image must be sampled to exactly that image."""
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    obj = ObjectiveConfig(name="flow", flow=FlowObjectiveConfig(prediction="sample"))
    smp = build_sampler(SamplerConfig(name=sampler, steps=6, cfg_scale=1.0), obj)
    out = sample(lambda x, t, c: target, smp, (2, 3, 8, 8), None, steps=6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target, atol=1e-5)


def test_decay_is_sized_from_measured_throughput():
    assert decay_plan([], 4.0, 0) is None  # nothing measured yet: stay at the peak rate
    segs = [{"minutes": 4.0, "segment_samples": 40_000}, {"minutes": 4.0, "segment_samples": 44_000}]
    assert decay_plan(segs, 4.0, 84_000) == {"start": 84_000, "samples": 42_000}
