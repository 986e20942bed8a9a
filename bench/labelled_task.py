"""The labelled task of the preference bench: handwritten digits, a short base, a reward classifier and an
independent judge, built once under a work dir and reused.

* Images: scikit-learn's 1,797 digits at 32 px, "a handwritten digit {d}" (``bench/adherence.py``'s writer).
* A key-hash split of the images into three disjoint parts (``tests/finetune/digits.py``, shared with the recipe
  test): ``reward`` (40%) trains the reward classifier (``tessera train-classifier``'s SmallCNN), ``judge`` (40%)
  the independent judge (an RBF SVM on the 8x8 grey image), and ``test`` (20%) measures both on real images
  neither saw, and is the reference of FID and the pixel distance.
* The base: the quickstart's model and training config (``configs/quickstart/train.yaml``), trained on all the
  digits for a fixed number of samples (deterministic under load, unlike minutes), short enough that its images
  are classified right only about half the time: headroom for fine-tuning to show.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adherence import REPO, ingest_folder, precompute, train, write_digits  # noqa: E402

from tests.finetune.digits import LABELS, PROMPT, SPLITS, Judge, split_of  # noqa: E402


def _subset(folder: Path, out: Path, part: str) -> Path:
    """Hard links of one split's images and sidecars."""
    out.mkdir(parents=True, exist_ok=True)
    for png in sorted(folder.glob("*.png")):
        if split_of(png.stem) == part:
            for src in (png, png.with_suffix(".json")):
                if not (out / src.name).exists():
                    os.link(src, out / src.name)
    return out


def read_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int) of a written folder, in name order."""
    from PIL import Image

    pngs = sorted(folder.glob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    labels = np.array([int(json.loads(p.with_suffix(".json").read_text())["label"]) for p in pngs])
    return images, labels


@dataclass
class Task:
    """Everything a run and its evaluation need, under one work dir."""

    work: Path
    data: Path  # all digits, with MiniLM embeddings: the base's training set
    test: Path  # the real test images (folder): both classifiers' held-out set and the FID reference
    reward_classifier: Path  # tessera train-classifier output (model.safetensors, config.json, split.json)
    report: dict  # both classifiers' held-out accuracies on the test images

    def judge(self) -> Judge:
        """The independent judge, refitted on its own images."""
        return Judge.for_part(32)

    @property
    def prompts(self) -> list[str]:
        """The ten label prompts, label order."""
        return [PROMPT.format(label=d) for d in LABELS]


def build_task(work: Path) -> Task:
    """Write, split and ingest the digits; train the reward classifier and score both classifiers on the test
    images (once; later calls read the cached report)."""
    from tessera.evaluation.classifier import TrainClassifierConfig, train_classifier

    work.mkdir(parents=True, exist_ok=True)
    folder, data, emb = work / "folder", work / "data", work / "data_minilm"
    if not (folder / "01796.json").exists():
        write_digits(folder)
    parts = {name: _subset(folder, work / f"split_{name}", name) for name, _ in SPLITS}
    if not (data / "manifest.json").exists():
        ingest_folder(folder, data)
    if not (emb / "manifest.json").exists():
        precompute(data, emb)
    clf, report_path = work / "reward_classifier", work / "classifiers.json"
    if not report_path.exists():
        for name in ("reward", "test"):
            if not (work / f"ds_{name}" / "manifest.json").exists():
                ingest_folder(parts[name], work / f"ds_{name}")
        rep = train_classifier(str(work / "ds_reward"), str(clf), eval_dataset=str(work / "ds_test"),
                               prompt_template=PROMPT, config=TrainClassifierConfig(epochs=30, hflip=False))
        x_test, y_test = read_folder(parts["test"])
        judge = Judge.for_part(32)
        report = {"reward_classifier": {"holdout_accuracy": rep["accuracy"], "n": rep["n"],
                                        "train_images": len(rep["train_keys"])},
                  "judge": {"holdout_accuracy": float(np.mean(judge.predict(x_test) == y_test)), "n": len(y_test),
                            "train_images": len(list(parts["judge"].glob("*.png"))), "model": "SVC(rbf, C=10) on 8x8 grey"}}
        report_path.write_text(json.dumps(report, indent=1))
    return Task(work, emb, parts["test"], clf, json.loads(report_path.read_text()))


def train_base(task: Task, samples: int, nproc: int = 2, run_id: str = "digits-base") -> Path:
    """The quickstart model trained on all digits for ``samples`` samples. Reused while its recipe (the quickstart
    training YAML, samples, ranks) is unchanged: a new field in the trainer's config (others edit it) must not retrain
    the base under runs that were tuned from it."""
    import hashlib

    run = task.work / "runs" / run_id
    recipe = {"samples": samples, "nproc": nproc,
              "train_yaml": hashlib.sha256((REPO / "configs/quickstart/train.yaml").read_bytes()).hexdigest()}
    stamp = run / "task_base.json"
    if (run / "checkpoints" / "latest").exists() and stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return run
    train(task.data, task.work / "runs", run_id, 600.0, nproc, [f"train.total_samples={samples}"])
    stamp.write_text(json.dumps(recipe))
    return run


def base_id(base: Path) -> str:
    """Which trained base this is (the hash of its checkpoint's index): a tuned run is compared with its own base."""
    import hashlib

    from tessera.trainer.inference import resolve_checkpoint

    index = Path(resolve_checkpoint(str(base))[1]) / "index.json"
    return hashlib.sha256(index.read_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------- measuring a model on the task


def heldout_sampler(checkpoint: str, cfg_scale: float):
    """The held-out guard's sampler for a checkpoint: its own (steps, solver) guided at ``cfg_scale`` at every step,
    as the rollouts are (``finetune/heldout.py``): base and tuned models are measured with this same sampler."""
    import dataclasses

    import torch

    from tessera.trainer.inference import load_for_sampling

    smp = load_for_sampling(str(checkpoint), device=torch.device("cpu"))[4]
    return dataclasses.replace(smp, cfg_scale=cfg_scale, guidance_interval=None)


def sample_images(checkpoint: str, prompts: list[str], per_prompt: int, sampler, seed: int = 0):
    """(N, 3, H, W) float in [-1, 1] (the 8-bit images), prompt-major, one per (prompt, seed) at fixed seeds."""
    import torch

    from tessera.evaluation.generate import image_seed
    from tessera.trainer.inference import load_for_sampling, sample_seeded

    model, te, ae, obj, _, (h, w) = load_for_sampling(str(checkpoint), device=torch.device("cpu"))
    items = [(p, k) for p in range(len(prompts)) for k in range(per_prompt)]
    out = []
    for i in range(0, len(items), 50):
        chunk = items[i:i + 50]
        pil = sample_seeded(model, te, ae, sampler, obj, [prompts[p] for p, _ in chunk],
                            [image_seed(seed, p, k) for p, k in chunk], height=h, width=w, device=torch.device("cpu"))
        out += [torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) for im in pil]
    return torch.stack(out) / 127.5 - 1


def pixel_features(images) -> np.ndarray:
    """(N, 768): the 16x16 RGB image (2x2 block means of a 32-px one) in [0, 1], from (N, H, W, 3) uint8 arrays or
    (N, 3, H, W) arrays in [-1, 1]."""
    x = np.asarray(images, np.float64)
    x = (x + 1) / 2 if x.shape[1] == 3 else x.transpose(0, 3, 1, 2) / 255.0  # (N, 3, H, W) in [0, 1]
    n, c, h, w = x.shape
    return x.reshape(n, c, 16, h // 16, 16, w // 16).mean((3, 5)).reshape(n, -1)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the evaluation package's formula)."""
    from tessera.evaluation.fid import frechet_distance

    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def within_class_diversity(images: np.ndarray, labels: np.ndarray) -> float:
    """The held-out guard's diversity (mean pairwise RMS distance within a class) of real uint8 images."""
    import torch

    from tessera.finetune.heldout import diversity

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return diversity(x, labels.tolist())


class Scorer:
    """Scores a set of generated images of the task: judge and reward-classifier accuracy, diversity (with the real
    test images' own), and two distances to the real test images: FID/KID (Inception; the network and reference
    features are loaded once) and the pixel Fréchet distance (``pixel_fd``, 16x16 RGB). On 32-px digits Inception
    barely separates a healthy model from a reward-hacked one (base 360, a collapsed DRaFT run of coloured
    textures 314); the pixel distance rose 31.6 -> 46.9 on the same images."""

    def __init__(self, task: Task, fid: bool = True) -> None:
        from tessera.evaluation.classifier import load_classifier

        self.task, self.judge, self.clf = task, task.judge(), load_classifier(str(task.reward_classifier))
        self.fid, self._fid = fid, None
        real, real_labels = read_folder(task.test)
        self.real = pixel_features(real)
        self.real_diversity = within_class_diversity(real, real_labels)

    def _reference(self):
        from tessera.evaluation.fid import compute_fid_stats
        from tessera.evaluation.inception import load_inception

        if self._fid is None:
            net = load_inception(None, "cpu")
            mu, sig, meta = compute_fid_stats(str(self.task.test), net, 32, None, keep_features=True)
            self._fid = (net, mu, sig, meta["features"])
        return self._fid

    def __call__(self, images, per_prompt: int) -> dict:
        """Metrics of prompt-major images (``per_prompt`` per label) with per-image correctness for paired stats."""
        import torch

        from tessera.finetune.heldout import diversity

        labels = np.repeat(np.arange(len(LABELS)), per_prompt)
        judge_ok = self.judge.predict(images.numpy()) == labels
        with torch.no_grad():
            clf_pred = self.clf.predict_logits(images).argmax(-1).numpy()
            prob = torch.softmax(self.clf.predict_logits(images), -1)[torch.arange(len(labels)), labels].numpy()
        out = {"n": len(labels), "judge_accuracy": float(judge_ok.mean()), "judge_correct": judge_ok.tolist(),
               "reward_accuracy": float(np.mean(clf_pred == labels)), "reward_prob": float(prob.mean()),
               "judge_per_class": [float(judge_ok[labels == c].mean()) for c in range(len(LABELS))],
               "diversity": diversity(images, labels.tolist()),
               "pixel_fd": frechet(pixel_features(images.numpy()), self.real), "real_diversity": self.real_diversity}
        if self.fid:
            out.update(self._fid_kid(images))
        return out

    def _fid_kid(self, images) -> dict:
        from tessera.evaluation.fid import compute_fid_stats, frechet_distance
        from tessera.evaluation.images import PILSource
        from tessera.evaluation.kid import kid
        from tessera.trainer.inference import to_pil

        net, mu_r, sig_r, feats_r = self._reference()
        mu, sig, meta = compute_fid_stats(PILSource(to_pil(images)), net, 32, None, keep_features=True)
        size = min(len(feats_r), len(meta["features"]))
        k, _ = kid(feats_r, meta["features"], n_subsets=20, subset_size=size, seed=0)
        return {"fid": frechet_distance(mu, sig, mu_r, sig_r), "kid": float(k)}
