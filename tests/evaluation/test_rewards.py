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


# --------------------------------------------------------------------------- the fine-tuning rewards


def _shape(colour: tuple[int, int, int], size: int = 32, bg=(255, 255, 255)) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    img.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return img


def _as_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([pil_to_tensor(i).float() / 127.5 - 1 for i in imgs])


def test_jpeg_rewards_are_ddpos_size_in_kb():
    import io

    smooth = _shape((200, 30, 30))
    noise = images(1)[0]
    r = build_reward("jpeg_compressibility")
    comp = r.score([smooth, noise], ["a", "b"])
    sizes = []
    for im in (smooth, noise):  # DDPO's definition: JPEG quality 95, size in kB
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    assert comp == [-s for s in sizes] and comp[0] > comp[1]  # a flat image compresses better than noise
    assert build_reward("jpeg_incompressibility").score([smooth, noise], ["a", "b"]) == sizes
    # The tensor form scores the 8-bit image a sampler would save.
    np.testing.assert_allclose(r(_as_tensor([smooth, noise]), ["a", "b"]).numpy(), comp)


def test_colour_match_scores_the_prompts_colour_and_is_differentiable():
    r = build_reward("colour_match")
    red, blue = _shape((220, 20, 30)), _shape((30, 60, 230))
    s = r.score([red, red, blue, red], ["a red square", "a blue square", "a blue box", "a square"])
    assert s[0] > 0.9 and s[1] < 0.05 and s[2] > 0.6  # the white background is left out
    assert s[3] == 0.0 and r.no_colour == 1  # no colour word: 0, counted
    assert r.score([red], ["a red and blue flag"])[0] > 0.9  # any named colour counts
    x = _as_tensor([blue]).requires_grad_(True)
    before = r.score_tensor(x, ["a red square"])
    before.sum().backward()
    assert x.grad.abs().sum() > 0  # even a far colour gets a gradient at the default temperature
    stepped = x + 0.05 * x.grad / x.grad.abs().max()
    assert float(r.score_tensor(stepped.detach(), ["a red square"])) > float(before.detach())
    np.testing.assert_allclose(r(_as_tensor([red, blue]), ["a red box", "a red box"]).numpy(),
                               r.score([red, blue], ["a red box", "a red box"]), atol=1e-6)


def test_weighted_rewards_and_the_constant_control():
    from tessera.evaluation.rewards import RewardTerm, build_rewards

    imgs, caps = [_shape((220, 20, 30)), _shape((30, 60, 230))], ["a red box", "a red box"]
    w = build_rewards([RewardTerm(name="colour_match", weight=2.0),
                       RewardTerm(name="constant", weight=-1.0, options={"value": "0.5"})])
    cm = build_reward("colour_match").score(imgs, caps)
    np.testing.assert_allclose(w(imgs, caps).numpy(), [2 * c - 0.5 for c in cm], atol=1e-9)
    assert set(w.components(imgs, caps)) == {"colour_match", "constant"} and w.differentiable
    x = _as_tensor(imgs).requires_grad_(True)
    w.score_tensor(x, caps).sum().backward()
    assert x.grad.abs().sum() > 0
    c = build_reward("constant", {"value": "3"})
    x = _as_tensor(imgs).requires_grad_(True)
    out = c.score_tensor(x, caps)
    out.sum().backward()
    assert out.tolist() == [3.0, 3.0] and float(x.grad.abs().sum()) == 0.0  # a signal-free control
    no_grad = build_rewards([RewardTerm(name="jpeg_compressibility"), RewardTerm(name="colour_match")])
    assert not no_grad.differentiable
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        no_grad.score_tensor(_as_tensor(imgs), caps)


def test_classifier_reward_rewards_the_prompts_class(tmp_path):
    from tessera.evaluation.classifier import ClassifierInfo, ImageClassifier, SmallCNN, save_classifier

    torch.manual_seed(0)
    clf = ImageClassifier(SmallCNN(3), ClassifierInfo(labels=["cat", "red panda", "panda"], image_size=16))
    save_classifier(clf, str(tmp_path / "clf"))
    r = build_reward("classifier", {"path": str(tmp_path / "clf")})
    assert r.target("a photo of a red panda") == 1 and r.target("a panda, sleeping") == 2
    assert r.target("a dog") is None
    x = _as_tensor([_shape((220, 20, 30)), _shape((30, 60, 230)), _shape((0, 160, 0))])
    probs = torch.softmax(clf.predict_logits(x), -1).detach()
    got = r(x, ["a cat", "a red panda", "a dog"])
    np.testing.assert_allclose(got.numpy(), [float(probs[0, 0]), float(probs[1, 1]), 0.0], rtol=1e-5)
    assert r.no_label == 1
    got = r(x, ["x", "y", "z"], {"labels": ["panda", 0, "cat"]})  # explicit classes win over the prompt
    np.testing.assert_allclose(got.numpy(), [float(probs[0, 2]), float(probs[1, 0]), float(probs[2, 0])], rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    r.score_tensor(xg, ["a cat", "a panda", "a cat"]).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in r.model.net.parameters())
