"""A reward term averaged over shifted views (evaluation/reward_views.py): the views, the mean, its gradient."""

from __future__ import annotations

import pytest
import torch

from tessera.evaluation.reward_views import RewardViews, shifted_views, view_shifts
from tessera.evaluation.rewards import Reward, RewardTerm, WeightedReward, build_rewards


class PixelReward(Reward):
    """Scores channel 0 of one pixel: its gradient marks exactly which pixels the reward reads."""

    name, differentiable, tensor_native = "pixel", True, True

    def __init__(self) -> None:
        self.no_label, self.seen = 0, []

    def score_tensor(self, images, prompts, meta=None):
        self.no_label += sum(p == "" for p in prompts)
        self.seen.append(list(meta["labels"]) if meta else None)
        return images[:, 0, 8, 8]


def term(views: int, shift: int) -> tuple[RewardTerm, PixelReward]:
    return RewardTerm(name="pixel", views=RewardViews(views=views, shift=shift)), PixelReward()


def test_views_are_a_fixed_set_of_distinct_shifts_with_the_image_first():
    cfg = RewardViews(views=9, shift=1)
    shifts = view_shifts(cfg)
    assert shifts[0] == (0, 0) and len(set(shifts)) == 9 and shifts == view_shifts(cfg)  # all 9 of the 3x3
    assert view_shifts(RewardViews(views=5, shift=2, seed=1)) != view_shifts(RewardViews(views=5, shift=2))
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float).reshape(2, 3, 6, 6)
    v = shifted_views(x, RewardViews(views=3, shift=2))
    assert v.shape == (6, 3, 6, 6) and torch.equal(v[:2], x)
    dy, dx = view_shifts(RewardViews(views=3, shift=2))[1]
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    assert torch.equal(v[2:4], padded[..., 2 - dy:8 - dy, 2 - dx:8 - dx])  # the content moved by (dy, dx)


def test_the_reward_is_the_mean_over_views_and_its_gradient_spreads_over_the_shifts():
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    t, r = term(9, 1)
    s = WeightedReward._term(t, r, x, ["a", "b", ""], {"labels": [1, 2, 3]}, grad=True)
    want = torch.stack([x[:, 0, 8 - dy, 8 - dx] for dy, dx in view_shifts(t.views)]).mean(0)
    torch.testing.assert_close(s, want)
    s.sum().backward()
    g = x.grad[0, 0]
    assert torch.allclose(g[7:10, 7:10], torch.full((3, 3), 1 / 9)) and float(g.sum()) == pytest.approx(1.0)
    assert r.seen == [[1, 2, 3] * 9]  # per-sample meta follows the views
    assert r.no_label == 1  # the unlabelled prompt counted once per image, not per view
    x1 = x.detach().clone().requires_grad_(True)
    t1, r1 = term(1, 0)
    WeightedReward._term(t1, r1, x1, ["a"] * 3, None, grad=True).sum().backward()
    assert int((x1.grad != 0).sum()) == 3  # one view reads one pixel per image


def test_views_score_pil_images_and_are_deterministic():
    from PIL import Image

    w = build_rewards([RewardTerm(name="colour_match", views=RewardViews(views=4, shift=2))])
    rng = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 255).byte().numpy()) for _ in range(2)]
    a, b = w(imgs, ["a red box"] * 2), w(imgs, ["a red box"] * 2)
    assert torch.equal(a, b) and a.shape == (2,)
    one = build_rewards([RewardTerm(name="colour_match")])(imgs, ["a red box"] * 2)
    assert not torch.equal(a, one)  # the shifted views changed the score


def test_impossible_views_are_refused_naming_the_term():
    with pytest.raises(ValueError, match=r"reward\[0\] \(colour_match\) views: 10 views need shift >= 2"):
        build_rewards([RewardTerm(name="colour_match", views=RewardViews(views=10, shift=1))])


def test_the_finetune_config_reads_views_from_yaml_and_checks_them():
    from tessera.config import ConfigError, apply_overrides, from_dict
    from tessera.finetune.config import FinetuneJobConfig as FinetuneConfig

    data = apply_overrides(FinetuneConfig, {"checkpoint": "x"},
                           ['reward=[{name: colour_match, views: {views: 8, shift: 2}}]'])
    cfg = from_dict(FinetuneConfig, data)
    assert cfg.reward[0].views == RewardViews(views=8, shift=2)
    cfg.check()
    bad = from_dict(FinetuneConfig, apply_overrides(FinetuneConfig, {"checkpoint": "x"},
                                                    ['eval.reward=[{name: constant, views: {views: 3}}]']))
    with pytest.raises(ConfigError, match=r"eval.reward\[0\] \(constant\) views: 3 views need shift >= 1"):
        bad.check()
    with pytest.raises(Exception, match="view"):  # a misspelt key is an error, not a default
        from_dict(FinetuneConfig, apply_overrides(FinetuneConfig, {"checkpoint": "x"},
                                                  ['reward=[{name: colour_match, views: {view: 8}}]']))
