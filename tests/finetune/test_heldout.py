"""The held-out guard's statistics and its early-stop rule, and Pick-a-Pic-style preference pairs."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tessera.finetune.config import GuardConfig
from tessera.finetune.heldout import HeldOut, diversity, paired
from tessera.finetune.methods.dpo import decode_image, read_pairs


def test_paired_statistics_and_win_rate():
    base = np.array([0.1, 0.2, 0.3, 0.4])
    m = paired(base + np.array([0.1, 0.1, 0.0, 0.3]), base)
    d = np.array([0.1, 0.1, 0.0, 0.3])
    assert m["delta"] == pytest.approx(d.mean()) and m["delta_se"] == pytest.approx(d.std(ddof=1) / 2)
    assert m["win_rate"] == pytest.approx(0.875)  # three wins, one tie counted half


def test_diversity_is_the_mean_pairwise_rms_distance_within_a_prompt():
    a, b = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    imgs = torch.cat([a, b, a, a])
    assert diversity(imgs, [0, 0, 1, 1]) == pytest.approx(0.5)  # prompt 0: distance 1, prompt 1: 0


def test_early_stop_only_when_the_reward_rose_and_a_bound_passed():
    guard = SimpleNamespace(cfg=GuardConfig(max_kl=0.5, max_fid=100.0))
    rose = {"reward": 0.6, "base_reward": 0.4}
    assert HeldOut.bound_passed(guard, {**rose, "kl": 0.4, "fid": 90.0}) is None
    assert "KL" in HeldOut.bound_passed(guard, {**rose, "kl": 0.7, "fid": 90.0})
    assert "FID" in HeldOut.bound_passed(guard, {**rose, "kl": 0.1, "fid": 120.0})
    assert HeldOut.bound_passed(guard, {"reward": 0.3, "base_reward": 0.4, "kl": 9.0}) is None


def test_held_out_images_are_guided_as_the_rollouts_are():
    # A base checkpoint that samples with a guidance interval: the held-out images still use the rollouts' guidance
    # (every step, rollout.cfg_scale), unless the config names its own sampler.
    from tessera.finetune.config import RolloutConfig
    from tessera.trainer.diffusion.objectives import ObjectiveConfig
    from tessera.trainer.diffusion.sampling import SamplerConfig

    base = SimpleNamespace(sampler=SamplerConfig(name="euler", steps=8, cfg_scale=3.0, guidance_interval=[0.3, 1.0]),
                           objective=ObjectiveConfig(name="flow"))
    rollout = RolloutConfig(steps=8, cfg_scale=4.5)
    prompts = SimpleNamespace(load=lambda: ["a red apple"])
    cfg = SimpleNamespace(prompts=prompts, seeds=2, seed=0, sampler=None)
    held = HeldOut(cfg, base, rollout, None, None, "cpu", (3, 8, 8))
    assert (held.sampler.cfg_scale, held.sampler.guidance_interval, held.sampler.steps) == (4.5, None, 8)
    own = SamplerConfig(name="euler", steps=4, cfg_scale=2.0, guidance_interval=[0.1, 1.0])
    assert HeldOut(SimpleNamespace(**{**vars(cfg), "sampler": own}), base, rollout, None, None, "cpu",
                   (3, 8, 8)).sampler is own


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_pick_a_pic_pairs_put_the_preferred_image_first_and_drop_ties(tmp_path):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    table = pa.table({"caption": ["a", "b", "c"], "jpg_0": [red, red, red], "jpg_1": [blue, blue, blue],
                      "label_0": [1.0, 0.0, 0.5]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    pairs = read_pairs(str(tmp_path / "pairs.parquet"))
    assert [(c, w == red, lo == blue) for c, w, lo in pairs] == [("a", True, True), ("b", False, False)]
    x = decode_image(red, (8, 16))
    assert x.shape == (3, 8, 16) and math.isclose(float(x[0].mean()), 1.0) and math.isclose(float(x[2].mean()), -1.0)
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [red]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="jpg_1"):
        read_pairs(str(tmp_path / "bad.parquet"))
