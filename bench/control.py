"""Control adherence of a trained ControlNet on CPU: edge F1 with the condition vs the no-control floor, over seeds.

The data are moving shapes (``tests/trainer/control_data.py``): the caption names the colour and the shape, never
where the shape is or how big, so a text-to-image base cannot know the layout, and only the condition (Canny edges,
``tessera data condition``) can tell it. One base model is trained on the images alone; then, per seed, a DiT
control branch (PixArt's scheme) is trained on it, and held-out conditions are sampled with the branch at scale 1
(ours) and at scale 0 (the peer: the base without control, the floor), with the same prompts and seeds. The real
held-out images against their own conditions give the ceiling (1.0 for Canny: the same annotator).

    .venv/bin/python bench/control.py                     # the default "few minutes" setting
    .venv/bin/python bench/control.py --seeds 3 --control-samples 4000

Everything runs through the real CLI paths: `tessera train` (DeepSpeed ZeRO-2 on CPU) for base and branch, and
``trainer.inference.generate`` for sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402

from tests.trainer import helpers as H  # noqa: E402
from tests.trainer.control_data import write_moving_shapes  # noqa: E402


def model_overrides(a) -> dict:
    """The base's (and branch's) model and loop settings."""
    return {"model.dit.hidden_size": a.width, "model.dit.depth": a.depth, "model.dit.num_heads": 4,
            "model.dit.patch_size": a.patch, "model.dit.base_size": a.size // a.patch, "data.batch_size": 16,
            "train.log_every_samples": 16 * 20, "train.deterministic": "false", "data.shuffle_buffer": 256,
            "samples.height": a.size, "samples.width": a.size, "train.ckpt_every_samples": 10 ** 7}


def prepare(a, root: Path) -> str:
    """Encoder, train and held-out sets with Canny conditions, and the base model; returns the encoder path."""
    from tessera.config import from_dict
    from tessera.data_pipeline.condition import run_condition
    from tessera.data_pipeline.condition_config import ConditionJobConfig

    enc = H.tiny_text_encoder(root / "enc")
    for name, n, seed in (("train", a.train_images, 0), ("held", a.held, 1)):
        if not (root / f"{name}_canny" / "manifest.json").exists():
            write_moving_shapes(root / name, n=n, size=a.size, shards=4 if name == "train" else 1, seed=seed)
            run_condition(from_dict(ConditionJobConfig, {"source": str(root / name), "output": str(root / f"{name}_canny"),
                                                         "conditions": {"canny": {"name": "canny"}},
                                                         "executor": "local"}, "bench"))
    if not (root / "runs" / "base" / "checkpoints" / "latest").exists():
        t0 = time.time()
        H.check(H.run_train(H.overrides(root, "base", str(root / "train"), enc, **model_overrides(a), **{
            "train.total_samples": a.base_samples, "optim.lr": a.base_lr, "cfg_dropout.p": 0.1}), timeout=7200))
        print(f"base: {a.base_samples} samples in {time.time() - t0:.0f} s", flush=True)
    return enc


def train_branch(a, root: Path, enc: str, seed: int) -> Path:
    """A control branch on the base, for ``seed``; returns its run dir."""
    run = root / "runs" / f"ctl{seed}"
    if not (run / "checkpoints" / "latest").exists():
        t0 = time.time()
        H.check(H.run_train(H.overrides(root, f"ctl{seed}", str(root / "train_canny"), enc, **model_overrides(a), **{
            "model.init_from": str(root / "runs" / "base"), "train.seed": seed, "train.total_samples": a.control_samples,
            "model.control": f"{{condition: canny, blocks: {a.blocks}, dropout: {a.dropout}}}",
            "optim.lr": a.control_lr, "cfg_dropout.p": 0.0}), timeout=7200))
        print(f"branch seed {seed}: {a.control_samples} samples in {time.time() - t0:.0f} s", flush=True)
    return run


def adherence(a, root: Path, run: Path, seed: int) -> dict[str, float]:
    """Held-out edge F1 at control scale 1 and 0 (same prompts, conditions and seeds), and of the real images."""
    import torch

    from tessera.evaluation.control import ControlScorer, load_control_set
    from tessera.trainer.inference import generate, load_for_sampling

    cset = load_control_set(str(root / "held_canny"), "canny", a.held)
    scorer = ControlScorer(cset)
    model, te, ae, obj, smp, _ = load_for_sampling(str(run), device=torch.device("cpu"))
    smp = dataclasses.replace(smp, steps=a.steps, cfg_scale=a.cfg)
    out = {"ceiling": scorer.ceiling()}
    idx = list(range(len(cset.prompts)))
    for name, scale in (("control", 1.0), ("floor", 0.0)):
        imgs = generate(model, te, ae, smp, obj, cset.prompts, height=a.size, width=a.size, seed=seed,
                        device=torch.device("cpu"), controls=cset.conditions, control_scale=scale)
        out[name] = scorer.mean(imgs, idx)
    return out


def main() -> None:
    """Train the base once and a branch per seed; report edge F1 with control vs the floor."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="bench/results/control_work")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--train-images", type=int, default=2048)
    p.add_argument("--held", type=int, default=64)
    p.add_argument("--base-samples", type=int, default=8000)
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--control-samples", type=int, default=3200)
    p.add_argument("--control-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    a = p.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    enc = prepare(a, root)
    scores: dict[int, dict] = {}
    seeds = iter(range(a.seeds))
    order: list[int] = []

    def run_floor():  # the peer: the same branch at control scale 0 (the base without control)
        s = next(seeds)
        order.append(s)
        scores[s] = adherence(a, root, train_branch(a, root, enc, s), s)
        print(f"seed {s}: {scores[s]}", flush=True)
        return scores[s]["floor"], scores[s]

    def run_control():
        return scores[order[-1]]["control"], scores[order[-1]]

    report = Report("control", params=vars(a), libraries=["torch", "deepspeed", "opencv-python-headless"])
    report.compare(Comparison(name="held-out Canny edge F1", metric="edge F1", higher_is_better=True,
                              peer="no control (scale 0)", ours="ControlNet (scale 1)"), run_floor, run_control,
                   repeats=a.seeds)
    print(f"ceiling (real images): {scores[0]['ceiling']:.4f}")
    report.write()


if __name__ == "__main__":
    main()
