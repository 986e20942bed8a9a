"""CLIP score on a tiny random open_clip model loaded through our checkpoint-path code.

Parity is checked two ways: (1) torchmetrics' own ``functional.clip_score`` code, fed our open_clip
model through a minimal HF-style model/processor adapter (torchmetrics accepts a callable returning
``(model, processor)``), and (2) an independent re-implementation of its definition
``max(mean(100 * cos), 0)`` straight from open_clip's ``encode_image``/``encode_text``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from tessera.evaluation.clip_score import clip_score, clip_scores, cosine_similarities, load_clip

PROMPTS = ["a smiling face", "a red apple", "a blue car", "a cat", "an owl at night", "a pizza"]


def make_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


class _HFStyleModel:
    """Just enough of transformers' CLIPModel for torchmetrics' clip_score."""

    def __init__(self, clip) -> None:
        self.clip, self.config = clip, SimpleNamespace()

    def to(self, device):
        return self

    def get_image_features(self, pixel_values):
        return self.clip.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask):
        return self.clip.model.encode_text(input_ids)


class _HFStyleProcessor:
    """Just enough of CLIPProcessor: open_clip's transform and tokenizer."""

    def __init__(self, clip) -> None:
        self.clip = clip

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack([self.clip.preprocess(to_pil_image(i)) for i in images])}
        ids = self.clip.tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_matches_torchmetrics_functional_clip_score(tiny_clip_model):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    images = make_images(len(PROMPTS))
    clip = tiny_clip_model
    tensors = [pil_to_tensor(im) for im in images]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = tm_clip_score(tensors, PROMPTS, model_name_or_path=lambda: (_HFStyleModel(clip), _HFStyleProcessor(clip)))
        # torchmetrics' per-pair scores (100 * cos, before its clamp of the mean)
        per_pair, n = _clip_score_update(tensors, PROMPTS, _HFStyleModel(clip), _HFStyleProcessor(clip))
    ours = clip_score(images, PROMPTS, clip, batch_size=4)
    assert ours == pytest.approx(tm.item(), rel=1e-5, abs=1e-5)
    cos = cosine_similarities(images, PROMPTS, clip, batch_size=4)
    torch.testing.assert_close(100 * cos, per_pair.float(), rtol=1e-5, atol=1e-4)
    # The random model gives cosines of both signs: per-pair clamp and clamp-of-mean differ.
    assert (cos < 0).any() and (cos > 0).any()


def test_matches_independent_definition(tiny_clip_model):
    clip = tiny_clip_model
    images = make_images(len(PROMPTS))
    with torch.no_grad():
        px = torch.stack([clip.preprocess(im) for im in images])
        img = F.normalize(clip.model.encode_image(px), dim=-1)
        txt = F.normalize(clip.model.encode_text(clip.tokenizer(PROMPTS)), dim=-1)
    cos = (img * txt).sum(-1).double()  # (N,)
    torch.testing.assert_close(cosine_similarities(images, PROMPTS, clip, batch_size=4).double(), cos,
                               rtol=1e-5, atol=1e-6)
    assert clip_score(images, PROMPTS, clip) == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-4)
    np.testing.assert_allclose(clip_scores(images, PROMPTS, clip), (100 * cos.clamp_min(0)).numpy(), atol=1e-4)


def test_checkpoint_is_really_loaded(tiny_clip, tiny_clip_model, tmp_path):
    import open_clip
    from safetensors.torch import load_file

    arch, ckpt = tiny_clip
    fresh = open_clip.create_model(arch, pretrained=None)  # different random init
    loaded = tiny_clip_model.model
    w = "visual.conv1.weight"
    assert torch.equal(loaded.state_dict()[w], load_file(str(ckpt))[w])
    assert not torch.equal(loaded.state_dict()[w], fresh.state_dict()[w])
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_clip(arch, "openai")  # a hub tag is never downloaded: only local files
    with pytest.raises(ValueError, match="equal"):
        clip_score(make_images(2), ["one prompt"], tiny_clip_model)


def test_tensor_path_matches_pil_path(tiny_clip_model):
    clip = tiny_clip_model
    images = [im.resize((32, 32)) for im in make_images(3)]  # model size: no resize on either path
    x = torch.stack([pil_to_tensor(im).float() / 127.5 - 1 for im in images])  # (3, 3, 32, 32) in [-1, 1]
    torch.testing.assert_close(clip.encode_image_tensor(x).detach(), clip.encode_images(images),
                               rtol=1e-4, atol=1e-4)
