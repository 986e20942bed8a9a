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


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tessera eval``."""
    from tessera.cli_args import add_config_args

    p = subparsers.add_parser(
        "eval", help="evaluate checkpoints with a suite: FID/KID, CLIP score, rewards, HTML report, W&B",
        description="Generate the suite's images for each checkpoint (resumable; locally or on Ray actors), "
                    "compute its metrics and write <output>/metrics.json, <output>/report.html and a W&B run. "
                    "A checkpoint is a training checkpoint dir, a run dir (its newest checkpoint) or an export "
                    "dir, local or s3://.")
    add_config_args(p, required=True)
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="checkpoint, run or export dir (local or s3://); repeat for several")
    p.set_defaults(func=_eval)


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
