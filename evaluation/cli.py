"""``tessera eval``: run an evaluation suite on one or more checkpoints (heavy imports inside the command)."""

from __future__ import annotations

import argparse
import sys


def _eval(args: argparse.Namespace) -> int:
    """Run the suite on every ``--checkpoint``; print a metrics table and where the outputs are."""
    from tessera.cli_args import load_from_args
    from tessera.evaluation.config import EvalSuiteConfig
    from tessera.evaluation.suite import run_suite

    cfg = load_from_args(EvalSuiteConfig, args)  # exits 0 after printing the config on --dry-run
    if not args.checkpoint:
        print("tessera eval: error: at least one --checkpoint is required", file=sys.stderr)
        return 2
    out = run_suite(cfg, args.checkpoint)
    for ck in out["checkpoints"]:
        vals = "  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in ck["metrics"].items())
        print(f"{ck['label']} (step {ck['checkpoint']['step']}): {vals}")
    print(f"metrics: {cfg.output.rstrip('/')}/metrics.json")
    if out.get("report"):
        print(f"report:  {out['report']}")
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    """Train the fixed classifier on a labelled dataset; print its held-out accuracy and where it went."""
    from tessera.evaluation.classifier import TrainClassifierConfig, train_classifier

    cfg = TrainClassifierConfig(image_size=args.image_size, epochs=args.epochs, holdout_fraction=args.holdout,
                                hflip=args.hflip, seed=args.seed)
    rep = train_classifier(args.data, args.out, eval_dataset=args.eval_data, label_field=args.label_field,
                           caption_template=args.caption_template, prompt_template=args.prompt_template, config=cfg)
    print(f"held-out accuracy {rep['accuracy']:.4f} on {rep['n']} real images ({len(rep['labels'])} labels)")
    for lab, acc in rep["per_class"].items():
        print(f"  {lab}: {acc:.3f}")
    print(f"classifier: {args.out.rstrip('/')}/model.safetensors + config.json")
    return 0


def _add_train_classifier(subparsers: argparse._SubParsersAction) -> None:
    """``tessera train-classifier``: the judge of the classifier-accuracy metric and the ``classifier`` reward."""
    p = subparsers.add_parser(
        "train-classifier", help="train the small fixed CNN judge on a labelled dataset (classifier accuracy)",
        description="Train evaluation/classifier.py's fixed CNN on a Tessera dataset whose samples carry a label "
                    "(a field of KEY.json, or a caption template such as 'a photo of a {label}'); writes "
                    "model.safetensors + config.json with its accuracy on held-out real images.")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled Tessera dataset (local or s3://)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (local or s3://)")
    p.add_argument("--eval-data", metavar="DIR", help="held-out labelled dataset (default: a key-hash share of --data)")
    p.add_argument("--label-field", default="label", help="KEY.json field holding the label")
    p.add_argument("--caption-template", help="read labels from captions, e.g. 'a photo of a {label}'")
    p.add_argument("--prompt-template", help="prompts the metric makes from labels (default: the caption "
                                             "template, else 'a photo of a {label}')")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--holdout", type=float, default=0.1, help="held-out share of --data without --eval-data")
    p.add_argument("--hflip", action="store_true", help="mirror augmentation (not for digits, text or flags)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_classifier)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tessera eval`` and ``tessera train-classifier``."""
    from tessera.cli_args import add_config_args

    p = subparsers.add_parser(
        "eval", help="evaluate checkpoints with a suite: FID/KID, CLIP score, rewards, HTML report, W&B",
        description="Generate the suite's images for each checkpoint (resumable; locally or on Ray actors), "
                    "compute its metrics and write <output>/metrics.json, <output>/report.html and a W&B run. "
                    "A checkpoint is a training checkpoint dir, a run dir (its newest checkpoint) or an export "
                    "dir, local or s3://.")
    add_config_args(p, required=True, example="tessera eval --config configs/eval/quick.yaml --checkpoint "
                                              "runs/quickstart/runs/train sampling.steps=20 sampling.images_per_prompt=2")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="checkpoint, run or export dir (local or s3://); repeat for several")
    p.set_defaults(func=_eval)
    _add_train_classifier(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m tessera.evaluation.cli eval ...`` (same as ``tessera eval ...``)."""
    from tessera.config import ConfigError
    from tessera.log import setup_logging

    parser = argparse.ArgumentParser(prog="tessera")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging("INFO")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
