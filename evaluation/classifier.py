"""A small, fixed image classifier: the judge of "classifier accuracy on generated images" and of the
``classifier`` reward.

Classification Accuracy Score / GAN-test (Ravuri & Vinyals 2019; Shmelkov et al. 2018): train a classifier on
real labelled images, then ask it whether each generated image shows the class its prompt named. A metric is
only as good as its classifier, so training records the classifier's accuracy on held-out real images in
``config.json``, and every report shows it next to the generated-image accuracy.

The architecture is fixed and versioned (``ARCH``), so a number names exactly what measured it:

    input (B, 3, S, S) in [-1, 1], S = ``image_size`` (any H x W is resized to S x S, bilinear, antialiased)
    3 stages of [conv3x3 -> GroupNorm(8) -> SiLU] x 2 -> maxpool2, widths 16, 32, 64      (B, 64, S/8, S/8)
    global average pool -> dropout 0.2 -> linear to n_labels                              (B, n_labels)

~73k parameters (10 labels); GroupNorm (not BatchNorm), so a prediction never depends on the rest of its batch and the
logits are differentiable in the pixels (reward backprop). Weights are ``model.safetensors``; labels, size,
architecture and the held-out accuracy are ``config.json``. Nothing is unpickled.

Labels come from a Tessera dataset: a ``label`` field in each sample's ``KEY.json``, or a caption template such
as ``"a photo of a {label}"`` matched against ``KEY.txt``.

Why our own: torchvision's classifiers are ImageNet-sized (millions of parameters, 224 px) and need downloaded
weights; a 32-px CPU judge that trains in a minute on the project's own data is ~40 lines.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tessera import storage

log = logging.getLogger("tessera.eval.classifier")

ARCH = "tessera-cnn-v1"
WIDTHS = (16, 32, 64)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(kw_only=True)
class ClassifierInfo:
    """``config.json``: what the weights classify and how well they did on held-out real images."""

    arch: str = ARCH
    labels: list[str]
    image_size: int = 32
    prompt_template: str = "a photo of a {label}"  # prompts made from the labels for the accuracy metric
    holdout_accuracy: float | None = None  # on real images never trained on
    holdout_images: int = 0
    holdout_per_class: dict[str, float] = field(default_factory=dict)
    train_images: int = 0
    dataset: str = ""
    train: dict = field(default_factory=dict)  # the training settings


class _Stage(nn.Sequential):
    """[conv3x3 -> GroupNorm -> SiLU] x 2 -> maxpool2."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """The fixed classifier network (module docstring)."""

    def __init__(self, n_labels: int) -> None:
        super().__init__()
        chans = (3, *WIDTHS)
        self.features = nn.Sequential(*[_Stage(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(WIDTHS[-1], n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))  # (B, C): global average pool
        return self.head(self.drop(h))  # (B, n_labels)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), bilinear with antialiasing (differentiable); a no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float in [-1, 1] (alpha composited on white)."""
    if "A" in img.getbands():
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    arr = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return arr.view(img.height, img.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageClassifier:
    """A trained ``SmallCNN`` with its labels: logits for tensors (differentiable), class indices for images."""

    def __init__(self, net: SmallCNN, info: ClassifierInfo) -> None:
        self.net, self.info = net.eval(), info
        self.labels: list[str] = list(info.labels)
        self.image_size: int = info.image_size

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.net.parameters()).device

    def to(self, device) -> ImageClassifier:
        """Move the weights; returns self."""
        self.net.to(device)
        return self

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1], any H x W -> (B, n_labels) logits; differentiable in ``images``."""
        x = resize_to(images.to(self.device, torch.float32), self.image_size)
        return self.net(x)

    def predict(self, images: list[Image.Image]) -> list[int]:
        """The predicted label index of each PIL image."""
        return self.predict_tensors([pil_to_tensor(im) for im in images])

    @torch.no_grad()
    def predict_tensors(self, images: list[torch.Tensor], batch_size: int = 256) -> list[int]:
        """Predicted label indices of (3, H, W) tensors in [-1, 1] (sizes may differ)."""
        out: list[int] = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([resize_to(t[None], self.image_size)[0] for t in images[i:i + batch_size]])  # (b,3,S,S)
            out += self.predict_logits(x).argmax(-1).tolist()
        return out


def save_classifier(clf: ImageClassifier, out_dir: str) -> None:
    """Write ``model.safetensors`` and ``config.json`` to a local or s3:// directory."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in clf.net.state_dict().items()}
    storage.write_bytes(storage.join(out_dir, "model.safetensors"), save(state))
    storage.write_text(storage.join(out_dir, "config.json"), json.dumps(asdict(clf.info), indent=1))


def load_classifier(path: str, device: str | torch.device = "cpu") -> ImageClassifier:
    """A classifier directory (``model.safetensors`` + ``config.json``, local or s3://) -> ``ImageClassifier``."""
    from safetensors.torch import load

    from tessera.config import from_dict

    cfg_url = storage.join(str(path), "config.json")
    if not storage.exists(cfg_url):
        raise FileNotFoundError(f"{cfg_url}: no classifier config (train one with `tessera train-classifier`)")
    info = from_dict(ClassifierInfo, json.loads(storage.read_text(cfg_url)), cfg_url)
    if info.arch != ARCH:
        raise ValueError(f"{cfg_url}: arch {info.arch!r} is not {ARCH!r}")
    net = SmallCNN(len(info.labels))
    net.load_state_dict(load(storage.read_bytes(storage.join(str(path), "model.safetensors"))))
    return ImageClassifier(net, info).to(device)


# --------------------------------------------------------------------------- labelled data


def template_regex(template: str) -> re.Pattern:
    """``"a photo of a {label}"`` -> a regex whose group ``label`` captures the label of a matching caption."""
    if template.count("{label}") != 1:
        raise ValueError(f"caption template {template!r} must contain '{{label}}' exactly once")
    head, tail = template.split("{label}")
    return re.compile(rf"^{re.escape(head)}(?P<label>.+?){re.escape(tail)}$", re.IGNORECASE)


def label_of(meta: dict, caption: str, label_field: str, pattern: re.Pattern | None) -> str | None:
    """A sample's label: the ``label_field`` of its KEY.json (top level, or under ``meta`` where ingest keeps a
    source's extra fields), else the caption template's match, else None."""
    for where in (meta, meta.get("meta") or {}):
        if isinstance(where, dict) and where.get(label_field) is not None:
            return str(where[label_field])
    m = pattern.match(caption.strip()) if pattern is not None else None
    return m.group("label") if m else None


def read_labelled(dataset: str, label_field: str = "label", template: str | None = None
                  ) -> tuple[list[str], list[torch.Tensor], list[str], dict[str, int]]:
    """(keys, (3, H, W) images in [-1, 1], labels, counts of unlabelled/undecodable samples) of a Tessera dataset."""
    from tessera.tars import read_samples

    manifest = json.loads(storage.read_text(storage.join(dataset, "manifest.json")))
    pattern = template_regex(template) if template else None
    keys, images, labels, skipped = [], [], [], {"unlabelled": 0, "decode_error": 0}
    for shard in manifest["shards"]:
        for s in read_samples(storage.join(dataset, shard["name"])):
            meta = json.loads(s.members["json"]) if "json" in s.members else {}
            caption = s.members["txt"].decode("utf-8") if "txt" in s.members else ""
            label = label_of(meta, caption, label_field, pattern)
            ext = next((e for e in IMAGE_EXTS if e in s.members), None)
            if label is None or ext is None:
                skipped["unlabelled"] += 1
                continue
            try:
                img = Image.open(io.BytesIO(s.members[ext]))
                img.load()
            except Exception:  # PIL raises many types for corrupt files: counted, never silent
                skipped["decode_error"] += 1
                continue
            keys.append(s.key)
            images.append(pil_to_tensor(img))
            labels.append(label)
    if not keys:
        raise ValueError(f"{dataset}: no labelled samples (no {label_field!r} in KEY.json and no caption matching "
                         f"{template!r}); skipped {skipped}")
    return keys, images, labels, skipped


def is_holdout(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic Bernoulli(fraction) from the sample key: the classifier's held-out real images."""
    h = hashlib.sha256(f"classifier-holdout:{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def natural_key(label: str) -> tuple:
    """Sort "2" before "10", then by text."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


# --------------------------------------------------------------------------- training


@dataclass(kw_only=True)
class TrainClassifierConfig:
    """How the classifier is trained (recorded in its ``config.json``)."""

    image_size: int = 32
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    holdout_fraction: float = 0.1  # of the dataset, by key hash, when no eval dataset is given
    hflip: bool = False  # mirror augmentation: wrong for digits and flags, right for most photos
    max_shift: int = 2  # random translation in pixels (reflect padding), at image_size
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps the current setting


def _augment(x: torch.Tensor, cfg: TrainClassifierConfig, g: torch.Generator) -> torch.Tensor:
    """Random translation (and flip) of a (B, 3, S, S) batch."""
    if cfg.max_shift:
        s = cfg.max_shift
        pad = F.pad(x, (s, s, s, s), mode="reflect")
        dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
        x = pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    if cfg.hflip and torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    return x


def accuracy_report(pred: list[int], target: list[int], labels: list[str]) -> dict:
    """Overall and per-class accuracy and the confusion matrix (rows: true label, columns: predicted)."""
    n = len(labels)
    conf = [[0] * n for _ in range(n)]
    for p, t in zip(pred, target):
        conf[t][p] += 1
    per_class = {labels[i]: (conf[i][i] / sum(conf[i])) for i in range(n) if sum(conf[i])}
    acc = sum(conf[i][i] for i in range(n)) / max(1, len(target))
    return {"accuracy": acc, "n": len(target), "per_class": per_class, "confusion": conf, "labels": labels}


def train_classifier(dataset_dir: str, out_dir: str, *, eval_dataset: str | None = None, label_field: str = "label",
                     caption_template: str | None = None, prompt_template: str | None = None,
                     config: TrainClassifierConfig | None = None) -> dict:
    """Train the fixed CNN on a labelled Tessera dataset, write it to ``out_dir``; returns its held-out report.

    Held-out real images are ``eval_dataset`` when given, else a key-hash ``holdout_fraction`` of the data."""
    cfg = config or TrainClassifierConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keys, images, names, skipped = read_labelled(dataset_dir, label_field, caption_template)
    if eval_dataset:
        ev_keys, ev_images, ev_names, _ = read_labelled(eval_dataset, label_field, caption_template)
        train_idx = list(range(len(keys)))
    else:
        held = [is_holdout(k, cfg.holdout_fraction, cfg.seed) for k in keys]
        train_idx = [i for i, h in enumerate(held) if not h]
        ev = [i for i, h in enumerate(held) if h]
        ev_keys, ev_images, ev_names = [keys[i] for i in ev], [images[i] for i in ev], [names[i] for i in ev]
    labels = sorted(set(names), key=natural_key)
    index = {lab: i for i, lab in enumerate(labels)}
    x = torch.stack([resize_to(images[i][None], cfg.image_size)[0] for i in train_idx])  # (N, 3, S, S)
    y = torch.tensor([index[names[i]] for i in train_idx])
    torch.manual_seed(cfg.seed)
    net = SmallCNN(len(labels))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-len(y) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    net.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(net(_augment(x[idx], cfg, g)), y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, float(loss.detach()))
    info = ClassifierInfo(labels=labels, image_size=cfg.image_size, train_images=len(y), dataset=str(dataset_dir),
                          prompt_template=prompt_template or caption_template or "a photo of a {label}",
                          train=dict(asdict(cfg), label_field=label_field, caption_template=caption_template,
                                     eval_dataset=eval_dataset, skipped=skipped,
                                     seconds=round(time.perf_counter() - t0, 1)))
    clf = ImageClassifier(net, info)
    known = [i for i, n in enumerate(ev_names) if n in index]  # a label never seen in training cannot be right
    report = accuracy_report(clf.predict_tensors([ev_images[i] for i in known]) if known else [],
                             [index[ev_names[i]] for i in known], labels)
    report["unknown_labels"] = len(ev_names) - len(known)
    info.holdout_accuracy, info.holdout_images = report["accuracy"], report["n"]
    info.holdout_per_class = report["per_class"]
    save_classifier(clf, out_dir)
    # Which keys trained it and which measured it, so anyone can check the split (and score other models on it).
    split = {"train": [keys[i] for i in train_idx], "holdout": [ev_keys[i] for i in known]}
    storage.write_text(storage.join(out_dir, "split.json"), json.dumps(split))
    report.update(train_keys=split["train"], holdout_keys=split["holdout"])
    log.info("classifier: %d labels, %d training images, held-out accuracy %.3f on %d real images -> %s",
             len(labels), len(y), report["accuracy"], report["n"], out_dir)
    return report

