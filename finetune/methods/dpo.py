"""Diffusion-DPO (Wallace et al. 2023) on preference pairs.

Pairs come from a Pick-a-Pic-style parquet (``caption, jpg_0, jpg_1, label_0``; ties, label_0 = 0.5, are
dropped and counted) or on-policy: ``candidates`` samples per prompt from the shared sampler, ranked by the
reward, best vs worst (a group whose rewards are all equal gives no pair: its rows are masked out and counted).

Winner and loser share their noise and timestep: both rows draw from generators seeded alike, through the
objective's own denoising loss (so the DPO loss is that of whatever objective the model was trained with):

    inside = -beta/2 * ((l_w - l_l) - (l_w_ref - l_l_ref)),  loss = -log sigmoid(inside)

At init (adapters 0) policy and reference agree, inside = 0 and the loss is ln 2; ``implicit_acc`` is the
share of pairs with inside > 0.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tessera.finetune.methods.base import METHODS, Batch, Context, Method, micro_steps, sample_chunk
from tessera.trainer.diffusion.guidance import cat_cond

LN2 = math.log(2.0)


def read_pairs(path: str) -> list[tuple[str, bytes, bytes]]:
    """(caption, preferred image bytes, other image bytes) of every decided row; ties are dropped."""
    import pyarrow.parquet as pq

    from tessera import storage

    table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
    missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: preference parquet lacks column(s) {sorted(missing)}")
    rows = table.to_pydict()
    out = []
    for cap, a, b, lab in zip(rows["caption"], rows["jpg_0"], rows["jpg_1"], rows["label_0"]):
        if lab in (0, 1):
            out.append((str(cap), a, b) if lab == 1 else (str(cap), b, a))
    if not out:
        raise ValueError(f"{path}: no decided pair (label_0 0 or 1)")
    return out


def decode_image(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Image bytes -> (3, H, W) in [-1, 1] at ``size`` (height, width), bicubic."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@METHODS.register("dpo")
class DPO(Method):
    """Diffusion-DPO with the reference = adapters off (or the frozen copy)."""

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        self.per_step = micro_steps(job.rollout.batches_per_update, cfg.steps_per_update, "dpo")
        self.pairs = read_pairs(cfg.parquet) if cfg.pairs == "parquet" else None

    def backward_calls(self) -> int:
        """One backward per micro-batch of pairs."""
        return self.per_step

    def _on_policy(self, ctx: Context, batch: Batch, prompts: list[str], keys: list[str]):
        """(x0 winners, x0 losers, valid mask) from ``candidates`` samples per prompt, best vs worst."""
        g = self.cfg.candidates
        c = sample_chunk(ctx, batch.update, [p for p in prompts for _ in range(g)],
                         [f"{k}/cand{i}" for k in keys for i in range(g)])
        r = c.rewards.view(len(prompts), g)
        best, worst = r.argmax(1), r.argmin(1)
        valid = r.max(1).values > r.min(1).values
        ctx.count("dpo_tied_groups", int((~valid).sum()))
        x = c.latents[:, -1].view(len(prompts), g, *c.latents.shape[2:])
        rows = torch.arange(len(prompts))
        return x[rows, best], x[rows, worst], valid

    def _from_parquet(self, ctx: Context, batch: Batch, n: int, offset: int):
        """(x0 winners, x0 losers, valid) for this rank's rows of the update's pairs (a seeded draw)."""
        rnd = random.Random(f"{ctx.seed}:{batch.update}")
        picks = [rnd.randrange(len(self.pairs)) for _ in batch.prompts]  # the update's global draw, every rank alike
        mine = picks[batch.local][offset:offset + n]
        size = (ctx.latent_shape[1] * ctx.autoencoder.downsample_factor,
                ctx.latent_shape[2] * ctx.autoencoder.downsample_factor)
        w = torch.stack([decode_image(self.pairs[i][1], size) for i in mine])
        lo = torch.stack([decode_image(self.pairs[i][2], size) for i in mine])
        return (ctx.autoencoder.encode(w), ctx.autoencoder.encode(lo), torch.ones(len(mine), dtype=torch.bool),
                [self.pairs[i][0] for i in mine])

    def update(self, ctx: Context, batch: Batch) -> dict[str, float]:
        """Make this update's pairs, then one DPO backward per micro-batch of pairs."""
        prompts, keys = batch.prompts[batch.local], batch.keys[batch.local]
        b, logs = self.job.rollout.batch_size, {"loss": [], "implicit_acc": [], "inside_abs": [], "loss_w": []}
        for s in range(self.cfg.steps_per_update):
            for c_i in range(s * self.per_step, (s + 1) * self.per_step):
                p, k = prompts[c_i * b:(c_i + 1) * b], keys[c_i * b:(c_i + 1) * b]
                if self.pairs is None:
                    xw, xl, valid = self._on_policy(ctx, batch, p, k)
                else:
                    xw, xl, valid, p = self._from_parquet(ctx, batch, len(p), c_i * b)
                self._train_pairs(ctx, batch.update, p, k, xw, xl, valid, logs)
        return {name: float(np.mean(v)) for name, v in logs.items() if v}

    def _train_pairs(self, ctx: Context, update: int, prompts, keys, xw, xl, valid, logs: dict) -> None:
        """The DPO loss of one micro-batch of pairs; one backward."""
        d = self.cfg.noise_draws
        cond, _ = ctx.condition(list(prompts) * d, 1.0)
        # rows: winners then losers, each the d draws of every pair: (2 d B, C, h, w)
        x0, cond2 = torch.cat([xw.repeat(d, 1, 1, 1), xl.repeat(d, 1, 1, 1)]).to(ctx.device), cat_cond(cond, cond)
        draw_keys = [f"{k}/dpo" if j == 0 else f"{k}/dpo{j}" for j in range(d) for k in keys]

        def gens():  # winner and loser rows draw the same timestep and noise
            return ctx.generators(update, draw_keys) + ctx.generators(update, draw_keys)

        losses, _ = ctx.objective.loss(ctx.train_fn, x0, cond2, gens())  # (2 d B,)
        with ctx.reference.model() as ref:
            ref_losses, _ = ctx.objective.loss(ctx.ref_fn(ref), x0, cond2, gens())
        lw, ll = losses.float().chunk(2)
        rw, rl = ref_losses.float().chunk(2)
        inside = -0.5 * self.cfg.beta * ((lw - ll) - (rw - rl))  # (d B,): one term per (draw, pair)
        m = valid.repeat(d).to(inside.device, inside.dtype)
        loss = (-F.logsigmoid(inside) * m).sum() / m.sum().clamp_min(1.0)
        ctx.engine.backward(loss)
        ctx.engine.step()
        with torch.no_grad():
            logs["loss"].append(float(loss))
            logs["implicit_acc"].append(float(((inside > 0).float() * m).sum() / m.sum().clamp_min(1.0)))
            logs["inside_abs"].append(float(inside.abs().max()))
            logs["loss_w"].append(float(lw.mean()))
