"""A control branch learns to follow its condition: on moving shapes (the layout is in no caption, so only the
condition can tell it) a tiny pixel-space DiT base is trained, then a PixArt-style branch on Canny edges; on held-out
conditions, edge F1 of the images sampled with the branch (scale 1) rises above the same model at scale 0 (the base,
the no-control floor).

Kept under ~90 s by training in this process with plain AdamW on the flow objective (v = noise - x0) and sampling
with a 10-step Euler loop; the trainer's own path (DeepSpeed, resume, 2 ranks) is covered by test_control_train.py,
and the longer measurement over seeds through `tessera train` is bench/control.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tessera.evaluation.annotators import AnnotatorConfig, build_annotator
from tessera.trainer.models import build_model
from tessera.trainer.models.control import ControlConfig, build_controlled
from tests.trainer.control_data import draw

pytestmark = pytest.mark.slow

SIZE, TEXT_DIM = 16, 8


def shapes(n: int, seed: int, canny) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(images (n, 3, S, S) in [-1, 1], Canny conditions likewise, the conditions as uint8 maps)."""
    rnd = random.Random(seed)
    imgs = [np.asarray(draw(rnd.choice(["red", "blue", "green", "yellow"]),
                            rnd.choice(["square", "circle", "triangle", "diamond"]), SIZE, rnd)) for _ in range(n)]
    conds = canny.annotate(imgs)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    c = torch.from_numpy(np.stack(conds)).float()[:, None].repeat(1, 3, 1, 1) / 127.5 - 1
    return x, c, conds


def call(model, x, t, **kw):
    """The model on empty text (the layout is what is learned here), t in [0, 1]."""
    B = x.shape[0]
    return model(x, t * 1000, torch.zeros(B, 1, TEXT_DIM), torch.ones(B, 1), None, **kw)


def fit(model, params, x, c, steps: int, lr: float, control: bool) -> None:
    """Flow matching (x_t = (1 - t) x0 + t eps, target eps - x0) with AdamW, batch 16."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(x), (16,), generator=g)
        t = torch.rand(16, generator=g)
        eps = torch.randn(x[i].shape, generator=g)
        xt = (1 - t)[:, None, None, None] * x[i] + t[:, None, None, None] * eps
        v = call(model, xt, t, **({"control": c[i]} if control else {}))
        loss = (v - (eps - x[i])).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def sample(model, cond: torch.Tensor, scale: float, steps: int = 10) -> list[np.ndarray]:
    """Euler from noise (t = 1) to data (t = 0), seeded; uint8 (H, W, 3) images."""
    x = torch.randn(cond.shape, generator=torch.Generator().manual_seed(5))
    ts = torch.linspace(1, 0, steps + 1)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * call(model, x, a.expand(x.shape[0]), control=cond, control_scale=scale)
    return list(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads per op made this 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_edge_f1_rises_above_the_no_control_floor(one_thread):
    torch.manual_seed(0)
    canny = build_annotator(AnnotatorConfig(name="canny"))
    x, c, _ = shapes(1024, 0, canny)
    _, held_c, held_maps = shapes(32, 1, canny)  # held-out conditions
    base = build_model("dit", dict(in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                                   text_dim=TEXT_DIM, base_size=SIZE // 2))
    fit(base, list(base.parameters()), x, c, steps=200, lr=2e-3, control=False)
    model = build_controlled(base, ControlConfig(condition="canny", blocks=1))
    fit(model, [p for p in model.parameters() if p.requires_grad], x, c, steps=200, lr=3e-3, control=True)

    def f1(scale: float) -> float:
        return float(np.mean([s["edge_f1"] for s in canny.score(sample(model, held_c, scale), held_maps)]))

    floor, controlled = f1(0.0), f1(1.0)
    print(f"held-out edge F1: control {controlled:.4f}, floor (scale 0) {floor:.4f}")
    assert controlled > floor + 0.03, (controlled, floor)
