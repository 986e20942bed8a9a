"""Reward models with tiny random weights: loading, batched scores, differentiable scores, score filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from tessera.evaluation.rewards import (REWARDS, AestheticHead, AestheticReward, PreferenceReward, build_reward,
                                REWARDS)

PROMPTS = ["a red apple", "a cat", "a blue car", "an owl", "a pizza"]


def images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    """A tiny-embedding (16-d) aesthetic head saved as .safetensors and as .pth."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = AestheticHead(16)
    root = tmp_path_factory.mktemp("head")
    save_file(head.state_dict(), str(root / "head.safetensors"))
    torch.save(head.state_dict(), root / "head.pth")
    return head, root


def test_registry_names():
    assert {"aesthetic", "preference", "clip_score"} <= set(REWARDS.names())
    with pytest.raises(KeyError, match="did you mean 'aesthetic'"):
        REWARDS.get("aesthetics")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_reward(tiny_clip, tiny_clip_model, head_files, fmt):
    arch, ckpt = tiny_clip
    head, root = head_files
    reward = build_reward("aesthetic", {"clip_arch": arch, "clip_checkpoint": str(ckpt),
                                        "head": str(root / f"head.{fmt}"), "device": "cpu", "batch_size": "2"})
    assert isinstance(reward, AestheticReward) and reward.batch_size == 2
    imgs = images(5)
    scores = reward.score(imgs, PROMPTS)
    assert len(scores) == 5 and all(isinstance(s, float) for s in scores)
    # Definition: head(L2-normalised CLIP image embedding), computed here from the raw pieces.
    with torch.no_grad():
        emb = F.normalize(tiny_clip_model.model.encode_image(torch.stack([tiny_clip_model.preprocess(i) for i in imgs])), dim=-1)
        expected = head.eval()(emb).squeeze(-1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_aesthetic_head_dim_must_match_clip(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    arch, ckpt = tiny_clip
    save_file(AestheticHead(768).state_dict(), str(tmp_path / "l14_head.safetensors"))
    cfg = AestheticReward.Config(clip_arch=arch, clip_checkpoint=str(ckpt), head=str(tmp_path / "l14_head.safetensors"))
    with pytest.raises(ValueError, match="768-d but CLIP .* 16-d"):
        AestheticReward(cfg)


def test_preference_reward_and_gradients(tiny_clip, tiny_clip_model):
    arch, ckpt = tiny_clip
    reward = PreferenceReward(PreferenceReward.Config(arch=arch, checkpoint=str(ckpt), device="cpu"))
    imgs = images(3)
    scores = reward.score(imgs, PROMPTS[:3])
    with torch.no_grad():
        img = tiny_clip_model.encode_images(imgs)
        txt = tiny_clip_model.encode_texts(PROMPTS[:3])
        expected = tiny_clip_model.model.logit_scale.exp() * (img * txt).sum(-1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-4)

    x = torch.stack([pil_to_tensor(i).float() / 127.5 - 1 for i in imgs]).requires_grad_(True)  # (3, 3, 32, 32)
    s = reward.score_tensor(x, PROMPTS[:3])
    assert s.shape == (3,)
    np.testing.assert_allclose(s.detach().numpy(), scores, rtol=1e-3, atol=1e-3)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.clip.model.parameters())  # reward model stays frozen


def test_differentiable_scores_resize_larger_images(tiny_clip, head_files):
    arch, ckpt = tiny_clip
    _, root = head_files
    for name, opts in [("aesthetic", {"clip_arch": arch, "clip_checkpoint": str(ckpt), "head": str(root / "head.pth")}),
                       ("clip_score", {"arch": arch, "checkpoint": str(ckpt)})]:
        reward = build_reward(name, dict(opts, device="cpu"))
        x = (torch.rand(2, 3, 48, 64) * 2 - 1).requires_grad_(True)
        s = reward.score_tensor(x, PROMPTS[:2])
        s.sum().backward()
        assert s.shape == (2,) and x.grad.abs().sum() > 0, name


def test_score_filters_via_ingest_registry(tiny_clip, head_files):
    from tessera.data_pipeline.scoring import ScoreFilterConfig, build_score_filters

    assert {"aesthetic", "preference", "clip_score"} <= set(REWARDS.names())
    arch, ckpt = tiny_clip
    _, root = head_files
    cfgs = [ScoreFilterConfig(name="clip_score", min=0.0, options={"arch": arch, "checkpoint": str(ckpt), "device": "cpu"}),
            ScoreFilterConfig(name="aesthetic", options={"clip_arch": arch, "clip_checkpoint": str(ckpt),
                                                         "head": str(root / "head.safetensors"), "device": "cpu"}),
            ScoreFilterConfig(name="preference", options={"arch": arch, "checkpoint": str(ckpt), "device": "cpu"})]
    filters = build_score_filters(cfgs)
    imgs = images(3)
    for f in filters:
        vals = f.scorer.score(imgs, PROMPTS[:3])
        assert f.scorer.name == f.cfg.name and len(vals) == 3
    assert all(v >= 0 for v in filters[0].scorer.score(imgs, PROMPTS[:3]))  # 100 * max(cos, 0)
    with pytest.raises(Exception, match="unknown key 'arhc'"):
        build_reward("preference", {"arhc": "x", "checkpoint": str(ckpt)})
