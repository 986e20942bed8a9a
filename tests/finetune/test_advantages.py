"""Advantages: DDPO's per-prompt running statistics (with the batch standing in below min_count, and buffers that
survive a checkpoint), GRPO's group-relative form, and the share of groups that teach nothing."""

from __future__ import annotations

import json

import numpy as np

from tessera.finetune.advantages import PerPromptStats, group_advantages, zero_std_share


def test_per_prompt_stats_use_the_batch_until_min_count_then_the_buffer():
    st = PerPromptStats(buffer_size=4, min_count=3)
    r1 = np.array([1.0, 2.0, 10.0])
    a1 = st.update(["a", "a", "b"], r1)
    np.testing.assert_allclose(a1, (r1 - r1.mean()) / (r1.std() + 1e-6))  # too few per prompt: batch stats
    a2 = st.update(["a", "b"], np.array([3.0, 20.0]))
    buf_a = np.array([1.0, 2.0, 3.0])  # "a" reached min_count: its own buffer
    assert a2[0] == (3.0 - buf_a.mean()) / (buf_a.std() + 1e-6)
    st.update(["a", "a"], np.array([4.0, 5.0]))
    assert list(st.buffers["a"]) == [2.0, 3.0, 4.0, 5.0]  # buffer_size keeps the newest


def test_per_prompt_stats_round_trip_through_json_exactly():
    st = PerPromptStats(16, 2)
    rng = np.random.default_rng(0)
    st.update(["x", "y", "x"], rng.random(3))
    copy = PerPromptStats(16, 2)
    copy.load_state_dict(json.loads(json.dumps(st.state_dict())))
    r = rng.random(4)
    assert np.array_equal(st.update(["x", "y", "y", "x"], r), copy.update(["x", "y", "y", "x"], r))


def test_group_advantages_and_zero_std_groups():
    prompts = ["a"] * 3 + ["b"] * 3
    r = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(prompts, r, global_std=False)
    np.testing.assert_allclose(adv[:3], (r[:3] - 2.0) / (r[:3].std() + 1e-4))
    assert np.all(adv[3:] == 0)
    adv_g = group_advantages(prompts, r, global_std=True)
    np.testing.assert_allclose(adv_g[:3], (r[:3] - 2.0) / (r.std() + 1e-4))
    assert zero_std_share(prompts, r) == 0.5
