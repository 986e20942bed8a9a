"""The held-out guard against reward hacking, run on rank 0 every ``eval.every`` updates.

On held-out prompts (never trained on) at fixed seeds, with the deterministic sampler guided as the rollouts are:
* the mean reward and each reward term, paired against the base model's images of the same (prompt, seed)
  (mean difference, its standard error, win rate);
* the KL of the policy to the reference along the policy's own SDE trajectories: GRPO's penalty formula
  (``rollout.step_kl``, per dimension), averaged over the steps ``kl_window`` names (the trained ones);
* FID/KID against held-out real images (the evaluation package's code);
* sample diversity (mean pairwise RMS distance of one prompt's images).
Per-image records go to ``heldout/step_<N>.json`` (the base's to ``heldout/base.json``) for paired statistics
across runs; the bound check says when the reward rose while KL or FID passed its bound.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import torch

from tessera import storage
from tessera.evaluation.generate import image_seed
from tessera.finetune.rollout import GaussianPolicy, initial_noise, model_fn_of, policy_output, step_kl
from tessera.trainer.inference import make_grid, png_bytes, sample_seeded, to_pil

log = logging.getLogger("tessera.finetune.heldout")


def paired(r: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Mean paired difference, its standard error and t, and the win rate (ties count half) with its SE."""
    d = np.asarray(r, np.float64) - np.asarray(base, np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    win = float(np.mean(d > 0) + 0.5 * np.mean(d == 0))
    return {"delta": float(d.mean()), "delta_se": se, "delta_t": float(d.mean() / se) if se else 0.0,
            "win_rate": win, "win_rate_se": math.sqrt(win * (1 - win) / n) if n else float("nan")}


def diversity(images: torch.Tensor, groups: list[int]) -> float:
    """Mean over prompts of the mean pairwise RMS distance between that prompt's images (B, 3, H, W)."""
    out = []
    for g in sorted(set(groups)):
        x = images[[i for i, k in enumerate(groups) if k == g]].flatten(1)  # (S, D)
        if len(x) > 1:
            d = torch.cdist(x.double(), x.double()) / math.sqrt(x.shape[1])
            out.append(float(d.sum() / (len(x) * (len(x) - 1))))
    return float(np.mean(out)) if out else float("nan")


class HeldOut:
    """Held-out prompts x seeds, the base model's record, and the metrics of a policy against it."""

    def __init__(self, cfg, base, rollout, reward, run, device, latent_shape, kl_cfg_scale: float | None = None
                 ) -> None:
        self.cfg, self.base, self.reward, self.run, self.device = cfg, base, reward, run, device
        self.prompts = cfg.prompts.load()
        self.items = [(p, s) for p in range(len(self.prompts)) for s in range(cfg.seeds)]
        self.seeds = [image_seed(cfg.seed, p, s) for p, s in self.items]
        self.captions = [self.prompts[p] for p, _ in self.items]
        # The rollouts' guidance (every step, at rollout.cfg_scale): what the fine-tuning optimises is what is scored.
        self.sampler = cfg.sampler or dataclasses.replace(base.sampler, cfg_scale=rollout.cfg_scale,
                                                          guidance_interval=None)
        self.rollout, self.latent_shape = rollout, latent_shape
        self.sde = GaussianPolicy(base.objective, rollout.steps, eta=rollout.eta, noise_level=rollout.noise_level,
                                  image_shape=(1, *latent_shape), spacing=base.sampler.timestep_spacing,
                                  window=rollout.sde_window)
        # The KL is measured as GRPO's penalty is computed: the same formula (rollout.step_kl), on the trained steps
        # (kl_window), with the training forward's guidance (policy gradient's train_cfg), so heldout/kl and the
        # training kl share one scale and eval.max_kl means the same for every method.
        lo, hi = kl_window(cfg, rollout)
        self.kl_steps = [s for s in self.sde.train_steps if lo <= s < hi]
        self.kl_cfg_scale = rollout.cfg_scale if kl_cfg_scale is None else kl_cfg_scale
        self._fid = None
        self.base_record: dict | None = None

    def images(self, model) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1]: one image per (prompt, seed), deterministic sampler."""
        h, w = self.base.size
        out, bs = [], self.rollout.batch_size
        for i in range(0, len(self.items), bs):
            pil = sample_seeded(model, self.base.text_encoder, self.base.autoencoder, self.sampler, self.base.objective,
                                self.captions[i:i + bs], self.seeds[i:i + bs], height=h, width=w, device=self.device)
            out.append(torch.stack([torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) for im in pil]))
        return torch.cat(out) / 127.5 - 1  # the 8-bit images, as saved

    @torch.no_grad()
    def kl(self, model, reference) -> float:
        """Mean over held-out samples and ``kl_steps`` of the per-dimension KL of the policy's step to the
        reference's (``rollout.step_kl``), along the policy's own SDE trajectories; 0 when they are one network."""
        pol, scale, bs = self.sde, self.kl_cfg_scale, self.rollout.batch_size
        if not self.kl_steps:
            return 0.0
        fn = model_fn_of(model)
        total = []
        for i in range(0, len(self.items), bs):
            caps = self.captions[i:i + bs]
            cond, both = _condition(self.base.text_encoder, caps, scale, self.device)
            gens = [torch.Generator().manual_seed(s) for s in self.seeds[i:i + bs]]
            x, kl = initial_noise(gens, self.latent_shape, self.device), torch.zeros(len(caps), dtype=torch.float64)
            for s in range(max(self.kl_steps) + 1):  # the trajectory up to the last measured step
                idx = torch.full((len(caps),), s, dtype=torch.long)
                x_next, _, mean, _ = pol.step(policy_output(fn, pol, x, idx, cond, both, scale), idx, x,
                                              generators=gens)
                if s in self.kl_steps:
                    with reference.model() as ref:
                        mean_ref, _ = pol.mean_std(policy_output(model_fn_of(ref), pol, x, idx, cond, both, scale),
                                                   idx, x)
                    kl += step_kl(pol, mean, mean_ref, idx).double().cpu()
                x = x_next
            total.append(kl / len(self.kl_steps))
        return float(torch.cat(total).mean())

    def fid_kid(self, images: torch.Tensor) -> dict[str, float]:
        """FID and KID of the held-out images against the real held-out set."""
        from tessera.evaluation.fid import compute_fid_stats, frechet_distance
        from tessera.evaluation.images import PILSource
        from tessera.evaluation.inception import load_inception
        from tessera.evaluation.kid import kid
        from tessera.evaluation.stats_cache import StatsCache

        if self._fid is None:
            net = load_inception(self.cfg.fid_network, self.device)
            mu, sig, meta = compute_fid_stats(self.cfg.fid_reference, net, 32, StatsCache(),
                                              keep_features=True)
            self._fid = (net, mu, sig, meta["features"])
        net, mu_r, sig_r, feats_r = self._fid
        mu, sig, meta = compute_fid_stats(PILSource(to_pil(images)), net, 32, None, keep_features=True)
        size = min(len(feats_r), len(meta["features"]))
        k, _ = kid(feats_r, meta["features"], n_subsets=20, subset_size=size, seed=0)
        return {"fid": frechet_distance(mu, sig, mu_r, sig_r), "kid": k}

    def measure(self, model) -> dict:
        """Per-image rewards and the set metrics of one model's held-out images."""
        images = self.images(model)
        comps = self.reward.components(images, self.captions)
        rec = {"reward": self.reward(images, self.captions).tolist(),
               "components": {k: v.tolist() for k, v in comps.items()},
               "diversity": diversity(images, [p for p, _ in self.items])}
        if self.cfg.fid_reference:
            rec.update(self.fid_kid(images))
        return rec, images

    def ensure_base(self, reference) -> dict:
        """The base model's record (read from the run when a previous process wrote it)."""
        url = self.run.path("heldout", "base.json")
        if self.base_record is None and storage.exists(url):
            self.base_record = json.loads(storage.read_text(url))
        if self.base_record is None:
            with reference.model() as ref:
                rec, _ = self.measure(ref)
            self.base_record = dict(rec, prompts=self.captions, seeds=self.seeds)
            storage.write_text(url, json.dumps(self.base_record))
        return self.base_record

    def evaluate(self, model, reference, update: int, tracker) -> tuple[dict[str, float], str | None]:
        """Metrics of ``model`` (logged under ``heldout/``) and the early-stop reason, if any."""
        base = self.ensure_base(reference)
        rec, images = self.measure(model)
        r = np.asarray(rec["reward"])
        m = {"reward": float(r.mean()), "reward_se": float(r.std(ddof=1) / math.sqrt(len(r))) if len(r) > 1 else 0.0,
             "base_reward": float(np.mean(base["reward"])), "diversity": rec["diversity"],
             "base_diversity": base["diversity"], **paired(r, np.asarray(base["reward"]))}
        m.update({f"reward/{k}": float(np.mean(v)) for k, v in rec["components"].items()})
        if self.cfg.kl:
            m["kl"] = self.kl(model, reference)
        for k in ("fid", "kid"):
            if k in rec:
                m[k], m[f"base_{k}"] = rec[k], base[k]
        storage.write_text(self.run.path("heldout", f"step_{update:09d}.json"),
                           json.dumps(dict(rec, update=update, metrics=m)))
        self._grid(images, update, tracker)
        tracker.log({f"heldout/{k}": v for k, v in m.items()}, step=update)
        log.info("held-out at update %d: reward %.4f (base %.4f, paired delta %.4f +- %.4f, win %.3f)%s", update,
                 m["reward"], m["base_reward"], m["delta"], m["delta_se"], m["win_rate"],
                 f", KL {m['kl']:.4g}" if "kl" in m else "")
        return m, self.bound_passed(m)

    def bound_passed(self, m: dict) -> str | None:
        """Why to stop early: the reward rose but KL or FID passed its bound."""
        if m["reward"] <= m["base_reward"]:
            return None
        if self.cfg.max_kl is not None and m.get("kl", 0.0) > self.cfg.max_kl:
            return f"held-out KL {m['kl']:.4g} > eval.max_kl {self.cfg.max_kl}"
        if self.cfg.max_fid is not None and m.get("fid", 0.0) > self.cfg.max_fid:
            return f"held-out FID {m['fid']:.4g} > eval.max_fid {self.cfg.max_fid}"
        return None

    def _grid(self, images: torch.Tensor, update: int, tracker) -> None:
        """The first ``grid_prompts`` prompts' first-seed images as a PNG in samples/ and in W&B."""
        pick = [i for i, (p, s) in enumerate(self.items) if s == 0][: self.cfg.grid_prompts]
        pil, caps = to_pil(images[pick]), [self.captions[i] for i in pick]
        grid = make_grid(pil, caps, scale=max(1, 96 // max(self.base.size[0], 1)))
        storage.write_bytes(self.run.path("samples", f"step_{update:09d}.png"), png_bytes(grid))
        tracker.log_images("samples/heldout", pil, caps, step=update)


def kl_window(guard, rollout) -> tuple[int, int]:
    """[lo, hi) of the sampler steps the held-out KL covers: ``eval.kl_steps``, else the rollout's SDE window, else
    every step but the last. The last step's noise is tiny (flow: sigma_t -> 0 as t -> 0), so its KL is dominated by
    1 / sigma_t^2 of a step whose noise carries no signal; the shipped methods do not train on it either (GRPO's
    timestep_fraction 0.99, DDPO's sde_window [0, 9])."""
    if getattr(guard, "kl_steps", None):
        return tuple(guard.kl_steps)
    if rollout.sde_window:
        return tuple(rollout.sde_window)
    return (0, max(1, rollout.steps - 1))


def _condition(text_encoder, prompts: list[str], scale: float, device):
    """(cond, cond + empty prompt for guidance or None)."""
    from tessera.trainer.diffusion.guidance import cat_cond
    from tessera.trainer.inference import uncond_like

    cond = text_encoder.encode(list(prompts)).to(device)
    return cond, (cat_cond(cond, uncond_like(text_encoder, cond, device)) if scale != 1.0 else None)
