"""Naming an image's colours: one function for the colour-adherence metric, the ``attributes`` re-captioner and
the ``colour_match`` reward.

Every pixel is named after its nearest anchor colour in CIELAB (a fixed palette of the 11 basic colour terms,
several anchors per name). The background (transparent pixels, or the colour that fills most of the image's
border) is left out, so a red heart on white is "red", not "white". The soft version replaces the nearest
anchor by a softmax over anchor distances and is differentiable in the pixels, for reward backprop; as its
temperature goes to 0 it names exactly like the hard version.

Why our own: colour-naming libraries (webcolors, colornamer) name one RGB value after hundreds of CSS names;
adherence needs the basic terms people prompt with, counted by foreground share, on batches of tensors.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

# Basic colour terms (Berlin & Kay) with sRGB anchors spanning their light, dark and saturated forms.
PALETTE: dict[str, list[tuple[int, int, int]]] = {
    "red": [(220, 20, 30), (255, 0, 0), (170, 20, 30), (240, 80, 70)],
    "orange": [(255, 140, 0), (245, 120, 40), (255, 170, 60)],
    "yellow": [(255, 220, 0), (255, 204, 77), (245, 235, 120), (255, 240, 60), (255, 242, 185)],
    "green": [(0, 160, 0), (60, 180, 75), (0, 100, 0), (140, 200, 80), (30, 130, 90)],
    "blue": [(0, 0, 255), (30, 120, 230), (0, 0, 140), (100, 180, 240), (60, 80, 180)],
    "purple": [(128, 0, 128), (150, 60, 200), (100, 50, 140), (180, 130, 220)],
    "pink": [(255, 105, 180), (255, 182, 193), (230, 80, 150), (250, 150, 170), (250, 200, 190)],
    "brown": [(139, 69, 19), (160, 82, 45), (100, 60, 30), (190, 130, 80)],
    "black": [(0, 0, 0), (35, 35, 35), (62, 62, 62)],  # Noto's "black" glyphs are #424242
    "white": [(255, 255, 255), (240, 240, 235), (225, 225, 225)],
    "grey": [(128, 128, 128), (160, 160, 160), (195, 195, 195)],
}
NAMES = list(PALETTE)
_SYNONYMS = {"gray": "grey", "violet": "purple", "magenta": "pink", "crimson": "red", "scarlet": "red",
             "navy": "blue", "cyan": "blue", "turquoise": "blue", "golden": "yellow", "gold": "yellow"}
_WORD = re.compile(r"[a-z]+")
BORDER_SHARE = 0.6  # the border's most common colour is background when it fills this share of the border
# A pixel's weight rises from 0 to 1 between these CIELAB distances from the background colour: anti-aliased
# edges (blends with the background) count less than the shape's own colour.
BG_NEAR, BG_FAR = 4.0, 24.0


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> CIELAB (D65), differentiable."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(1e-12) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                     dtype=rgb.dtype, device=rgb.device)
    xyz = lin @ m.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _anchors(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, 3) anchor Lab values and (A,) the index of each anchor's name."""
    rgb = [c for name in NAMES for c in PALETTE[name]]
    owner = [i for i, name in enumerate(NAMES) for _ in PALETTE[name]]
    lab = _srgb_to_lab(torch.tensor(rgb, dtype=dtype, device=device) / 255.0)
    return lab, torch.tensor(owner, device=device)


def name_colour(rgb: tuple[float, float, float]) -> str:
    """The palette name of one sRGB colour (0-1 per channel): its nearest anchor, as every pixel is named."""
    lab = _srgb_to_lab(torch.tensor(rgb, dtype=torch.float32))
    anchors, owner = _anchors(lab.device, lab.dtype)
    return NAMES[int(owner[((anchors - lab) ** 2).sum(-1).argmin()])]


def foreground_weights(rgb: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) weights in [0, 1]: 0 for transparent pixels and for the border's dominant colour (when it fills
    ``BORDER_SHARE`` of the border), rising to 1 away from it; computed without gradient (the background is a
    property of the scene, not of the colours the reward pushes)."""
    with torch.no_grad():
        lab = _srgb_to_lab(rgb)  # (B, H, W, 3)
        w = torch.ones(lab.shape[:3], dtype=rgb.dtype, device=rgb.device)
        if alpha is not None:
            w = w * (alpha > 0.5).to(rgb.dtype)
        border = torch.cat([lab[:, 0], lab[:, -1], lab[:, 1:-1, 0], lab[:, 1:-1, -1]], dim=1)  # (B, P, 3)
        for b in range(lab.shape[0]):
            d = torch.cdist(border[b], border[b])  # (P, P): the border pixel most others are close to
            votes = (d < BG_NEAR).float().mean(1)
            best = int(votes.argmax())
            if votes[best] >= BORDER_SHARE:
                dist = (lab[b] - border[b, best]).norm(dim=-1)
                w[b] = w[b] * ((dist - BG_NEAR) / (BG_FAR - BG_NEAR)).clamp(0, 1)
        return w


def colour_shares(images: torch.Tensor, temperature: float = 0.0, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) RGB in [-1, 1] -> (B, len(NAMES)) share of the foreground named each colour (rows sum to 1,
    or to 0 for an image that is all background). ``temperature`` 0 names each pixel after its nearest anchor;
    > 0 gives a softmax over anchor distances (CIELAB units), differentiable in the pixels."""
    rgb = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3)
    lab = _srgb_to_lab(rgb)
    anchors, owner = _anchors(rgb.device, rgb.dtype)
    d2 = ((lab[..., None, :] - anchors) ** 2).sum(-1)  # (B, H, W, A)
    if temperature > 0:
        p_anchor = torch.softmax(-d2 / (temperature**2), dim=-1)
    else:
        p_anchor = torch.nn.functional.one_hot(d2.argmin(-1), anchors.shape[0]).to(rgb.dtype)
    p_name = torch.zeros(*p_anchor.shape[:-1], len(NAMES), dtype=rgb.dtype, device=rgb.device)
    p_name = p_name.index_add(-1, owner, p_anchor)  # (B, H, W, N)
    w = foreground_weights(rgb, alpha)[..., None]  # (B, H, W, 1)
    total = w.sum(dim=(1, 2)).clamp_min(1.0)  # (B, 1)
    return (p_name * w).sum(dim=(1, 2)) / total


def to_tensor(img: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A PIL image -> ((1, 3, H, W) in [-1, 1], (1, H, W) alpha in [0, 1] or None)."""
    arr = np.asarray(img.convert("RGBA") if "A" in img.getbands() else img.convert("RGB"), dtype=np.float32) / 255
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return t[:, :3] * 2 - 1, (t[:, 3] if t.shape[1] == 4 else None)


def dominant_colours(img: Image.Image, k: int = 3, min_share: float = 0.1) -> list[tuple[str, float]]:
    """The image's foreground colours by share, at most ``k``, each with at least ``min_share``."""
    rgb, alpha = to_tensor(img)
    shares = colour_shares(rgb, alpha=alpha)[0]
    order = shares.argsort(descending=True).tolist()
    return [(NAMES[i], float(shares[i])) for i in order[:k] if shares[i] >= min_share]


def colour_words(text: str) -> list[str]:
    """The basic colour terms a text names, in order of first mention (synonyms mapped: gray -> grey)."""
    out: list[str] = []
    for w in _WORD.findall(text.lower()):
        name = _SYNONYMS.get(w, w)
        if name in PALETTE and name not in out:
            out.append(name)
    return out
