"""A suite's metrics: FID/KID against the reference set, CLIP score and rewards per image, and prompt adherence
(classifier accuracy, colour adherence: ``evaluation/adherence.py``).

``MetricSet`` loads the heavy parts (the FID network, the reference statistics, the CLIP model, the reward
models) on first use and keeps them, so a suite over many checkpoints, or in-training evaluation every N
samples, pays for them once; a metric the suite disables never loads its network.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tessera.evaluation.adherence import classifier_accuracy, colour_adherence, label_prompts
from tessera.evaluation.clip_score import cosine_similarities, load_clip
from tessera.evaluation.config import EvalSuiteConfig
from tessera.evaluation.fid import compute_fid_stats, frechet_distance
from tessera.evaluation.inception import load_inception
from tessera.evaluation.kid import kid
from tessera.evaluation.prompts import load_prompt_set
from tessera.evaluation.rewards import build_reward
from tessera.evaluation.stats_cache import StatsCache

ITEM_KEYS = ("prompt_idx", "sample_idx")  # the per-image rows' identity columns; every other column is a score


class MetricSet:
    """The suite's metrics, with networks and reference statistics loaded once and reused."""

    def __init__(self, cfg: EvalSuiteConfig) -> None:
        self.cfg = cfg
        self._net = self._ref = self._clip = self._classifier = None
        self._scorers: list | None = None
        self._control = self._ceiling = None

    def inception(self):
        """The FID network, loaded on first use."""
        if self._net is None:
            device = None if self.cfg.fid.device == "auto" else self.cfg.fid.device
            self._net = load_inception(self.cfg.fid.network, device)
        return self._net

    def reference(self) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        """(mu, sigma, meta, description) of the reference set from the stats cache (features kept for KID)."""
        if self._ref is None:
            f = self.cfg.fid
            mu, sigma, meta = compute_fid_stats(f.reference, self.inception(), f.batch_size, StatsCache(f.stats_cache),
                                                keep_features=self.cfg.kid.enabled)
            stats_sha = hashlib.sha256(np.ascontiguousarray(mu, np.float64).tobytes()
                                       + np.ascontiguousarray(sigma, np.float64).tobytes()).hexdigest()
            desc = {"source": f.reference, "n": meta["n"], "failures": meta["failures"], "cache_key": meta["key"],
                    "cache": meta["cache"], "identity": meta["source"], "preprocess": meta["preprocess"],
                    "network": meta["network"], "stats_sha256": stats_sha}
            self._ref = (mu, sigma, meta, desc)
        return self._ref

    def scorers(self) -> list:
        """[(metric name, reward)] for the configured rewards, built from the reward registry."""
        if self._scorers is None:
            self._scorers = [(f"reward/{r.name}", build_reward(r.name, dict(r.options))) for r in self.cfg.rewards]
        return self._scorers

    def clip(self):
        """The CLIP-score model, loaded on first use."""
        if self._clip is None:
            self._clip = load_clip(self.cfg.clip_score.arch, self.cfg.clip_score.checkpoint)
        return self._clip

    def classifier(self):
        """The classifier-accuracy judge, loaded on first use."""
        if self._classifier is None:
            from tessera.evaluation.classifier import load_classifier

            self._classifier = load_classifier(self.cfg.classifier.path)
        return self._classifier

    def control_set(self):
        """The control set (``evaluation/control.py``), loaded on first use."""
        return self.control_scorer().set

    def control_scorer(self):
        """The control set's annotator and scores, loaded on first use."""
        if self._control is None:
            from tessera.evaluation.control import ControlScorer, load_control_set

            c = self.cfg.control
            self._control = ControlScorer(load_control_set(c.dataset, c.condition, c.n))
        return self._control

    def control_ceiling(self) -> float:
        """The control metric of the control set's real images (computed once)."""
        if self._ceiling is None:
            self._ceiling = self.control_scorer().ceiling()
        return self._ceiling

    def prompts(self) -> list[str]:
        """The suite's prompts: the control set's captions, the classifier's label prompts when it asks for them,
        else ``prompts:``."""
        if self.cfg.control.enabled:
            return self.control_set().prompts
        if self.cfg.classifier.enabled and self.cfg.classifier.prompts_from_labels:
            clf = self.classifier()
            return label_prompts(clf.labels, clf.info.prompt_template)
        return load_prompt_set(self.cfg.prompts)

    def evaluate(self, source, items: list, get_image, prompts: list[str]
                 ) -> tuple[dict, list[dict], dict | None, dict]:
        """(metrics, per-image scores, reference description, adherence details) for generated images.

        ``source`` is an ``ImageSource`` over exactly the generated images (for FID/KID);
        ``get_image(item)`` loads one image for the per-image scores. The details hold the per-class accuracy and
        confusion matrices of the adherence metrics (for the report).
        """
        metrics: dict[str, float] = {"n_images": len(items)}
        ref_desc = self._fid_kid(source, metrics) if self.cfg.fid.enabled else None
        per_image = [{"prompt_idx": p, "sample_idx": s} for p, s in items]
        if self.cfg.clip_score.enabled or self.cfg.rewards:
            self._score_images(items, get_image, prompts, per_image, metrics)
        details = self._adherence(items, get_image, prompts, per_image, metrics)
        return metrics, per_image, ref_desc, details

    def _adherence(self, items: list, get_image, prompts: list[str], per_image: list[dict], metrics: dict) -> dict:
        """Classifier accuracy and colour adherence: scalar metrics, per-image columns, and their details."""
        if not (self.cfg.classifier.enabled or self.cfg.colour.enabled):
            return {}
        images, item_prompts = [get_image(it) for it in items], [prompts[p] for p, _ in items]
        details: dict = {}
        if self.cfg.classifier.enabled:
            rep = classifier_accuracy(self.classifier(), images, item_prompts)
            metrics.update(classifier_accuracy=rep["accuracy"], classifier_scored=rep["n"])
            if rep["holdout_accuracy"] is not None:  # the judge's own accuracy on held-out real images
                metrics["classifier_holdout_accuracy"] = rep["holdout_accuracy"]
            metrics.update({f"classifier_accuracy/{k}": v for k, v in rep["per_class"].items()})
            details["classifier"] = {k: v for k, v in rep.items() if k != "per_image"}
            for row, extra in zip(per_image, rep["per_image"]):
                row.update(extra)
        if self.cfg.colour.enabled:
            rep = colour_adherence(images, item_prompts)
            metrics["colour_scored"] = rep["n"]
            if rep["accuracy"] is not None:  # None: no prompt names a colour
                metrics["colour_adherence"] = rep["accuracy"]
            details["colour"] = {k: v for k, v in rep.items() if k != "per_image"}
            for row, extra in zip(per_image, rep["per_image"]):
                row.update(extra)
        return details

    def score_columns(self, items: list, get_image, prompts: list[str]) -> dict[str, list[float]]:
        """Per-image raw scores of ``items``, a batch of images at a time: ``"clip_cos"`` (the CLIP cosine, when the
        suite scores CLIP) and each reward's metric name -> one float per item, in item order. Per image, so a
        sharded evaluation computes each rank's images' columns and ``apply_scores`` the gathered ones."""
        cols: dict[str, list[float]] = {}
        if self.cfg.clip_score.enabled:
            cols["clip_cos"] = []
        for name, _ in self.scorers():
            cols[name] = []
        bs = self.cfg.score_batch_size
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            images, caps = [get_image(it) for it in chunk], [prompts[p] for p, _ in chunk]
            if "clip_cos" in cols:
                cols["clip_cos"] += cosine_similarities(images, caps, self.clip(), self.cfg.clip_score.batch_size).tolist()
            for name, scorer in self.scorers():
                cols[name] += [float(v) for v in scorer.score(images, caps)]
        return cols

    @staticmethod
    def apply_scores(cols: dict[str, list[float]], per_image: list[dict], metrics: dict) -> None:
        """``score_columns``' output -> per-image columns (``clip_score`` = 100 max(cos, 0)) and their means."""
        for name, vals in cols.items():
            if name == "clip_cos":
                for row, c in zip(per_image, vals):
                    row["clip_score"] = 100.0 * max(c, 0.0)
                metrics["clip_score"] = max(100.0 * sum(vals) / len(vals), 0.0)  # torchmetrics' CLIPScore
            else:
                for row, v in zip(per_image, vals):
                    row[name] = v
                metrics[name] = sum(vals) / len(vals)

    def _score_images(self, items: list, get_image, prompts: list[str], per_image: list[dict], metrics: dict) -> None:
        """CLIP score and rewards: per-image columns and their means."""
        self.apply_scores(self.score_columns(items, get_image, prompts), per_image, metrics)

    def _fid_kid(self, source, metrics: dict) -> dict:
        """FID (and KID) of the generated images against the reference; returns the reference description."""
        mu_g, sig_g, meta_g = compute_fid_stats(source, self.inception(), self.cfg.fid.batch_size, None,
                                                keep_features=self.cfg.kid.enabled)
        if meta_g["failures"]:
            metrics["generated_decode_failures"] = sum(meta_g["failures"].values())
        return self.fid_kid_from(mu_g, sig_g, meta_g.get("features"), metrics)

    def fid_kid_from(self, mu_g, sig_g, feats_g, metrics: dict) -> dict:
        """FID (and KID, from the features ``feats_g``) of generated statistics against the reference, into
        ``metrics``; returns the reference description. The seam sharded in-training evaluation computes through."""
        mu_r, sig_r, meta_r, desc = self.reference()
        metrics["fid"] = frechet_distance(mu_g, sig_g, mu_r, sig_r)
        if self.cfg.kid.enabled:
            k = self.cfg.kid
            size = min(k.subset_size, len(meta_r["features"]), len(feats_g))
            metrics["kid"], metrics["kid_std"] = kid(meta_r["features"], feats_g, n_subsets=k.subsets,
                                                     subset_size=size, seed=k.seed)
            metrics["kid_mean"] = metrics["kid"]  # torchmetrics' name for it (KernelInceptionDistance -> kid_mean)
            metrics["kid_subset_size"] = size
        return desc
