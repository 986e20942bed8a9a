"""``tessera distill``; also the entry of ranks launched with ``--nproc``."""

from __future__ import annotations

import argparse

from tessera.cli_args import add_config_args


def add_commands(sub) -> None:
    """Register ``tessera distill``."""
    p = sub.add_parser("distill", help="distil a trained checkpoint into a 1-4 step student (progressive, lcm, "
                                       "reflow)",
                       description="Distil a training run, checkpoint or export into a few-step student under "
                                   "DeepSpeed: progressive distillation (eps/v/x0 and flow models), latent consistency "
                                   "(LCM, LCM-LoRA with lora.enabled=true) or reflow (flow models). The run directory "
                                   "is a training run's; `tessera sample`, `export` and `eval` sample its checkpoints "
                                   "with the student's own sampler. Resumes by default (train.resume=auto).")
    add_config_args(p, example="tessera distill --config configs/distill/lcm.yaml --checkpoint "
                               "runs/quickstart/runs/train train.total_samples=20000 method.lcm.sample_steps=4")
    p.add_argument("--checkpoint", default=None, help="the teacher: training run, checkpoint or export dir (local or "
                                                      "s3://); same as checkpoint=...")
    p.add_argument("--nproc", type=int, default=1, help="spawn N local ranks (CPU: gloo, CUDA: one GPU each)")
    p.set_defaults(func=cmd_distill)
    e = sub.add_parser("distill-export", help="export a distilled student as a diffusers folder with its scheduler",
                       description="`tessera export --format diffusers`, plus scheduler/ (diffusers' LCMScheduler) for "
                                   "an lcm student of a DDPM model even where no whole pipeline can be written; the "
                                   "Tessera-format export beside it is what `tessera sample` reads.")
    e.add_argument("--checkpoint", required=True, help="the distillation run, checkpoint or export")
    e.add_argument("--out", required=True, help="output directory (local)")
    e.add_argument("--components", choices=["path", "copy"], default="path")
    e.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    e.set_defaults(func=cmd_distill_export)


def cmd_distill(args: argparse.Namespace) -> int:
    """``tessera distill``: a teacher whose objective does not fit the method is refused before any process starts
    (also at ``--dry-run``, so ``tessera submit distill`` refuses it at submission)."""
    from tessera.cli_args import load_from_args
    from tessera.config import ConfigError
    from tessera.distill.config import DistillJobConfig

    if args.checkpoint:
        args.overrides = [*args.overrides, f"checkpoint={args.checkpoint}"]
    dry_run, args.dry_run = args.dry_run, False
    cfg = load_from_args(DistillJobConfig, args)
    if cfg.checkpoint:
        from tessera.distill.loop import teacher_config
        from tessera.distill.methods import ObjectiveMismatch

        try:
            teacher_config(cfg)
        except ObjectiveMismatch as e:
            raise ConfigError(str(e)) from None
        except FileNotFoundError:
            if not dry_run:
                raise
            # a submission host may not see the teacher (it is written by an earlier job): the run checks it
    if dry_run:
        from tessera.config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    if args.nproc > 1:
        from tessera.trainer.launch import spawn_local

        argv = ["distill"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        return spawn_local(argv, args.nproc)
    from tessera.distill.loop import distill

    return distill(cfg)


def cmd_distill_export(args: argparse.Namespace) -> int:
    """``tessera distill-export``."""
    from tessera.distill.export import export_student

    for note in export_student(args.checkpoint, args.out, components=args.components, use_ema=not args.raw):
        print(f"note: {note}")
    print(args.out)
    return 0
