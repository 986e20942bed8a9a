"""Rewards: LAION aesthetics, PickScore/HPSv2-style preference, CLIP score, colourfulness, and the weight-free
rewards that make preference fine-tuning provable on a CPU (JPEG (in)compressibility, colour match, a user's
small classifier, a constant for control runs).

Each reward is built from its typed config (``REWARDS.get(name)`` is the class, ``.Config`` its dataclass;
``build_reward(name, options)`` parses string options by the fields' types) and has one interface (``Reward``):
``reward(images, prompts, meta) -> (B,)`` batched without grad, and, where ``differentiable``,
``score_tensor(images (B, 3, H, W) in [-1, 1], prompts, meta) -> (B,)`` for reward backprop (the reward model's
own weights stay frozen). ``score(PIL images, captions) -> floats`` serves ingest score filters and evaluation
suites. ``build_rewards([RewardTerm(name, weight, options), ...])`` is a config's weighted sum.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from tessera.evaluation.clip_score import ClipModel, load_clip
from tessera.evaluation.reward_views import RewardViews, mean_over_views
from tessera.config import apply_overrides, from_dict
from tessera.registry import Registry

REWARDS: Registry[type] = Registry("reward model")


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP over an L2-normalised CLIP image embedding: (B, D) -> (B, 1)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        # Same layer indices as the published checkpoints (layers.0/2/4/6/7), so they load strictly.
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Head weights from .safetensors, or .pth/.pt via ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: aesthetic head weights not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB images (as every sampler's output is saved)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


class Reward:
    """The reward interface: ``reward(images, prompts, meta) -> (B,) scores`` (batched, no grad) and, when
    ``differentiable``, ``score_tensor(images, prompts, meta) -> (B,)`` with gradients w.r.t. the images.

    ``images`` is a (B, 3, H, W) tensor in [-1, 1] (what a sampler decodes) or a list of PIL images; ``meta``
    is optional per-batch information (e.g. ``{"labels": [...]}`` for the classifier reward). ``score`` (PIL
    images, captions -> floats) is the ingest score filters' and evaluation suites' form of the same call.
    Subclasses implement ``_score_pil`` (PIL in) or, when ``tensor_native``, ``score_tensor`` (tensor in).
    """

    name = "reward"
    batch_size = 32
    differentiable = False  # score_tensor is implemented
    tensor_native = False  # __call__ on a tensor uses score_tensor (no 8-bit round trip)

    def _score_pil(self, images: list[Image.Image], prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """Differentiable (B,) scores of (B, 3, H, W) images in [-1, 1]."""
        raise NotImplementedError(f"reward {self.name!r} is not differentiable")

    @torch.no_grad()
    def __call__(self, images, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """(B,) float64 scores on the CPU, ``batch_size`` images at a time, no grad."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk, caps = images[i:i + self.batch_size], list(prompts[i:i + self.batch_size])
            part = _slice_meta(meta, i, i + self.batch_size)
            if isinstance(chunk, torch.Tensor):
                s = self.score_tensor(chunk, caps, part) if self.tensor_native else self._score_pil(
                    _to_pil(chunk), caps, part)
            else:
                s = self._score_pil(list(chunk), caps, part) if not self.tensor_native else self.score_tensor(
                    _to_tensor(list(chunk)), caps, part)
            out.append(torch.as_tensor(s).detach().cpu().double().reshape(-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One float per (image, prompt), batched, no grad (ingest filters, evaluation suites)."""
        return self(list(images), list(prompts)).tolist()


def _slice_meta(meta: dict | None, lo: int, hi: int) -> dict | None:
    """The rows [lo, hi) of every per-sample list in ``meta`` (other values pass through)."""
    if meta is None:
        return None
    return {k: v[lo:hi] if isinstance(v, (list, tuple, torch.Tensor)) else v for k, v in meta.items()}


@REWARDS.register("aesthetic")
class AestheticReward(Reward):
    """LAION aesthetic predictor: CLIP image embedding (L2-normalised) -> MLP head -> score (~1-10)."""

    name = "aesthetic"
    differentiable = True

    @dataclass(kw_only=True)
    class Config:
        clip_arch: str = "ViT-L-14"
        clip_checkpoint: str  # local open_clip weights (the head was trained on OpenAI ViT-L/14)
        head: str  # local .safetensors or .pth of the MLP head
        device: str = "auto"
        batch_size: int = 32

    def __init__(self, cfg: Config, clip: ClipModel | None = None) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.clip = clip or load_clip(cfg.clip_arch, cfg.clip_checkpoint, cfg.device)
        sd = load_head_state(cfg.head)
        d = self.clip.embed_dim
        w0 = sd.get("layers.0.weight")
        if w0 is None or w0.shape[1] != d:
            raise ValueError(f"{cfg.head}: head input is {None if w0 is None else w0.shape[1]}-d but "
                             f"CLIP {cfg.clip_arch} embeds in {d}-d")
        self.head = AestheticHead(d)
        self.head.load_state_dict(sd)
        self.head.eval().requires_grad_(False).to(self.clip.device)

    def _score_pil(self, images: list[Image.Image], prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        return self.head(self.clip.encode_images(images)).squeeze(-1).cpu()  # (B,)

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """Differentiable aesthetic score of (B, 3, H, W) images in [-1, 1] -> (B,); prompts unused."""
        return self.head(self.clip.encode_image_tensor(images)).squeeze(-1)


@REWARDS.register("preference")
class PreferenceReward(Reward):
    """PickScore/HPSv2-style: a fine-tuned open_clip model; score = exp(logit_scale) * cos(image, text)."""

    name = "preference"
    differentiable = True

    @dataclass(kw_only=True)
    class Config:
        arch: str = "ViT-H-14"
        checkpoint: str  # local fine-tuned open_clip weights (e.g. HPS_v2_compressed.pt)
        device: str = "auto"
        batch_size: int = 32

    def __init__(self, cfg: Config, clip: ClipModel | None = None) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.clip = clip or load_clip(cfg.arch, cfg.checkpoint, cfg.device)

    def _scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale.exp().float()  # CLIP's learned temperature, ~100

    def _score_pil(self, images: list[Image.Image], prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        img, txt = self.clip.encode_images(images), self.clip.encode_texts(prompts)  # (B, D) each
        return (self._scale() * (img * txt).sum(-1)).cpu()

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """Differentiable preference score of (B, 3, H, W) images in [-1, 1] with their prompts -> (B,)."""
        img = self.clip.encode_image_tensor(images)
        with torch.no_grad():  # text side is constant for reward backprop
            txt = self.clip.encode_texts_grad(prompts)
        return self._scale() * (img * txt).sum(-1)


@REWARDS.register("clip_score")
class ClipScoreReward(Reward):
    """CLIP score per pair: 100 * max(cos, 0) (see ``clip_score.py``)."""

    name = "clip_score"
    differentiable = True

    @dataclass(kw_only=True)
    class Config:
        arch: str = "ViT-L-14"
        checkpoint: str
        device: str = "auto"
        batch_size: int = 32

    def __init__(self, cfg: Config, clip: ClipModel | None = None) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.clip = clip or load_clip(cfg.arch, cfg.checkpoint, cfg.device)

    def _score_pil(self, images: list[Image.Image], prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        img, txt = self.clip.encode_images(images), self.clip.encode_texts(prompts)
        return (100 * (img * txt).sum(-1).clamp_min(0)).cpu()

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """Differentiable 100 * max(cos, 0) of (B, 3, H, W) images in [-1, 1] with their prompts -> (B,)."""
        img = self.clip.encode_image_tensor(images)
        with torch.no_grad():
            txt = self.clip.encode_texts_grad(prompts)
        return 100 * (img * txt).sum(-1).clamp_min(0)


@REWARDS.register("colorfulness")
class ColorfulnessReward(Reward):
    """Hasler & Suesstrunk (2003) colourfulness: sigma_rgyb + 0.3 * mu_rgyb; 0 for grey images (no weights)."""

    name = "colorfulness"

    @dataclass(kw_only=True)
    class Config:
        batch_size: int = 256

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size

    def _score_pil(self, images: list[Image.Image], prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        out = []
        for img in images:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            rg, yb = r - g, 0.5 * (r + g) - b
            out.append(float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())))
        return torch.tensor(out, dtype=torch.float64)


@REWARDS.register("jpeg_compressibility")
class JpegCompressibilityReward(Reward):
    """DDPO's compressibility reward: minus the JPEG size in kB at a fixed quality (no weights)."""

    name = "jpeg_compressibility"
    sign = -1.0

    @dataclass(kw_only=True)
    class Config:
        quality: int = 95  # DDPO's setting
        batch_size: int = 256

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size

    def _score_pil(self, images: list[Image.Image], prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        sizes = []
        for img in images:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=self.cfg.quality)
            sizes.append(buf.tell() / 1000)  # kB, as DDPO
        return self.sign * torch.tensor(sizes, dtype=torch.float64)


@REWARDS.register("jpeg_incompressibility")
class JpegIncompressibilityReward(JpegCompressibilityReward):
    """DDPO's incompressibility reward: the JPEG size in kB at a fixed quality."""

    name = "jpeg_incompressibility"
    sign = 1.0


@REWARDS.register("colour_match")
class ColourMatchReward(Reward):
    """The foreground share named by the prompt's colour words (``evaluation.colour``: the naming of the
    colour-adherence metric and the ``attributes`` captioner), soft and differentiable at ``temperature`` > 0.

    A prompt without a colour word scores 0; such prompts are counted in ``no_colour``."""

    name = "colour_match"
    differentiable = True
    tensor_native = True

    @dataclass(kw_only=True)
    class Config:
        temperature: float = 20.0  # CIELAB units of the soft naming (20: far colours still get a gradient); 0: hard
        batch_size: int = 256

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.no_colour = 0

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """(B,) sum of the shares of the colours each prompt names, in [0, 1]."""
        from tessera.evaluation.colour import NAMES, colour_shares, colour_words

        wanted = torch.zeros(len(prompts), len(NAMES), dtype=torch.float32, device=images.device)  # (B, N)
        for i, p in enumerate(prompts):
            for w in colour_words(p):
                wanted[i, NAMES.index(w)] = 1.0
        self.no_colour += int((wanted.sum(1) == 0).sum())
        shares = colour_shares(images, temperature=self.cfg.temperature)  # (B, N)
        return (shares * wanted.to(shares.dtype)).sum(1)


@REWARDS.register("classifier")
class ClassifierReward(Reward):
    """A user's small image classifier (``evaluation.classifier``: safetensors + config.json) rewarding the
    prompt's class: its probability (or log-probability). The class is ``meta["labels"]`` when given, else
    the longest label named in the prompt (whole words); a prompt naming none scores 0 and is counted."""

    name = "classifier"
    differentiable = True
    tensor_native = True

    @dataclass(kw_only=True)
    class Config:
        path: str  # directory with model.safetensors + config.json
        score: Literal["prob", "logprob"] = "prob"
        batch_size: int = 64

    def __init__(self, cfg: Config) -> None:
        from tessera.evaluation.classifier import load_classifier  # the classifier's own module, on demand

        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.model = load_classifier(cfg.path)
        self.model.net.requires_grad_(False)  # the reward's weights stay frozen; gradients flow to the images
        self.labels = list(self.model.labels)
        self.no_label = 0

    def target(self, prompt: str) -> int | None:
        """Index of the longest label named in ``prompt`` (whole words, case-insensitive), or None."""
        words = f" {' '.join(re.findall(r'[a-z0-9]+', prompt.lower()))} "
        hits = [(len(lab), i) for i, lab in enumerate(self.labels)
                if f" {' '.join(re.findall(r'[a-z0-9]+', lab.lower()))} " in words]
        return max(hits)[1] if hits else None

    def _targets(self, prompts: list[str], meta: dict | None) -> list[int | None]:
        if meta and meta.get("labels") is not None:
            return [lab if isinstance(lab, int) else self.labels.index(lab) for lab in meta["labels"]]
        return [self.target(p) for p in prompts]

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """(B,) probability (or log-probability) of each prompt's class, differentiable in the images."""
        targets = self._targets(prompts, meta)
        self.no_label += sum(t is None for t in targets)
        logp = torch.log_softmax(self.model.predict_logits(images).float(), dim=-1)  # (B, n_labels)
        idx = torch.tensor([t or 0 for t in targets], device=logp.device)
        picked = logp.gather(1, idx[:, None]).squeeze(1)
        picked = picked.exp() if self.cfg.score == "prob" else picked
        known = torch.tensor([t is not None for t in targets], device=logp.device)
        return torch.where(known, picked, torch.zeros_like(picked))


@REWARDS.register("constant")
class ConstantReward(Reward):
    """The same score for every image: the control of a fine-tuning experiment (no signal, same compute)."""

    name = "constant"
    differentiable = True
    tensor_native = True

    @dataclass(kw_only=True)
    class Config:
        value: float = 0.0
        batch_size: int = 256

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """(B,) ``value``, connected to the images' graph with a zero gradient."""
        return images.flatten(1).sum(1) * 0.0 + self.cfg.value


@dataclass(kw_only=True)
class RewardTerm:
    """One term of a weighted reward: a registry name, its weight and its options."""

    name: str
    weight: float = 1.0
    options: dict[str, str] = field(default_factory=dict)
    views: RewardViews = field(default_factory=RewardViews)  # the mean over shifted views (reward_views.py)


class WeightedReward(Reward):
    """sum_i w_i * reward_i: the fine-tuning reward of a config (a negative weight turns a reward around)."""

    name = "weighted"

    def __init__(self, terms: list[RewardTerm]) -> None:
        if not terms:
            raise ValueError("a reward needs at least one term")
        for i, t in enumerate(terms):
            t.views.validate(f"reward[{i}] ({t.name}) views")
        self.terms = [(t, build_reward(t.name, dict(t.options))) for t in terms]
        self.differentiable = all(r.differentiable for _, r in self.terms)
        self.batch_size = min(r.batch_size for _, r in self.terms)

    def components(self, images, prompts: list[str], meta: dict | None = None) -> dict[str, torch.Tensor]:
        """Each term's own (B,) scores (unweighted), keyed ``<name>`` (``<name>_<i>`` when a name repeats)."""
        out: dict[str, torch.Tensor] = {}
        for i, (t, r) in enumerate(self.terms):
            out[t.name if t.name not in out else f"{t.name}_{i}"] = self._term(t, r, images, prompts, meta)
        return out

    @staticmethod
    def _term(t: RewardTerm, r: Reward, images, prompts: list[str], meta: dict | None, grad: bool = False
              ) -> torch.Tensor:
        """One term's (B,) scores: of the images, or the mean over their shifted views (``t.views``)."""
        score = r.score_tensor if grad else r
        if t.views.views == 1:
            return score(images, prompts, meta)
        return mean_over_views(score, r, images if isinstance(images, torch.Tensor) else _to_tensor(list(images)),
                               prompts, meta, t.views)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """(B,) float64 weighted sum, no grad."""
        return sum(t.weight * self._term(t, r, images, prompts, meta) for t, r in self.terms)

    def score_tensor(self, images: torch.Tensor, prompts: list[str], meta: dict | None = None) -> torch.Tensor:
        """(B,) differentiable weighted sum; every term must be differentiable."""
        if not self.differentiable:
            bad = [t.name for t, r in self.terms if not r.differentiable]
            raise ValueError(f"reward term(s) {bad} have no differentiable score_tensor (needed by reward backprop)")
        return sum(t.weight * self._term(t, r, images, prompts, meta, grad=True) for t, r in self.terms)


def build_reward(name: str, options: dict[str, str] | None = None) -> Reward:
    """Build reward ``name`` from string options (parsed by the config's field types)."""
    cls = REWARDS.get(name)
    data = apply_overrides(cls.Config, {}, [f"{k}={v}" for k, v in (options or {}).items()])
    return cls(from_dict(cls.Config, data, source=f"reward {name!r} options"))


def build_rewards(terms: list[RewardTerm]) -> WeightedReward:
    """The weighted sum of a config's reward terms."""
    return WeightedReward(terms)
