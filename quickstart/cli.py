"""``tessera quickstart``: ingest -> precompute -> train -> sample -> evaluate -> report, in one command."""

from __future__ import annotations

import argparse
import sys


def add_commands(sub) -> None:
    """Register ``tessera quickstart``."""
    p = sub.add_parser(
        "quickstart", help="the whole platform end to end on real emoji + clip art, offline, on a CPU",
        description="Ingest ~5,000 emoji and clip-art images, re-caption them with measured attributes, "
                    "precompute MiniLM embeddings, train a small "
                    "pixel-space DiT with DeepSpeed ZeRO-2, sample grids of held-out prompts, compute FID before "
                    "and after, and write <out>/report.html plus a W&B offline run. A rerun resumes; a larger "
                    "--minutes continues training from the last checkpoint.")
    p.add_argument("--minutes", type=float, default=None,
                   help="training minutes (default: what --budget leaves after the other stages, ~13 min on 2 cores)")
    p.add_argument("--budget", type=float, default=18.5, metavar="MIN",
                   help="wall-clock minutes of a fresh run when --minutes is not given (default: 18.5)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="ingest at most N images (3/4 emoji, 1/4 clip art), e.g. for CI")
    p.add_argument("--nproc", type=int, default=2, help="training ranks (default: 2; 1 runs a single process)")
    p.add_argument("--configs", default=None, metavar="DIR",
                   help="directory with data/precompute/train/eval.yaml (default: configs/quickstart)")
    p.add_argument("--no-recaption", dest="recaption", action="store_false",
                   help="skip the attributes re-captioning stage and train on the alt text only")
    p.add_argument("--control", action="store_true",
                   help="after the final FID, train a ControlNet (DiT control branch) on Canny edges of the quickstart "
                        "data and report its control adherence (adds about --control-minutes + 1.5 min, outside "
                        "--budget)")
    p.add_argument("--control-minutes", type=float, default=3.0, metavar="MIN",
                   help="training minutes of the control branch (default: 3)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Run or resume the quickstart."""
    from tessera.quickstart.run import CONFIG_DIR, QuickstartOptions, run_quickstart

    if (args.minutes is not None and args.minutes <= 0) or args.budget <= 0 or args.nproc < 1 or (
            args.subset is not None and args.subset < 2) or args.control_minutes <= 0:
        print("tessera: error: --minutes, --budget and --control-minutes must be > 0, --nproc >= 1 and --subset >= 2",
              file=sys.stderr)
        return 2
    opts = QuickstartOptions(minutes=args.minutes, budget=args.budget, out=args.out, subset=args.subset,
                             nproc=args.nproc, configs=args.configs or str(CONFIG_DIR),
                             recaption=args.recaption, control=args.control, control_minutes=args.control_minutes)
    try:
        run_quickstart(opts)
    except RuntimeError as e:  # a failed stage: its message names the logs; a rerun resumes from there
        print(f"tessera quickstart: error: {e}", file=sys.stderr)
        return 1
    return 0
