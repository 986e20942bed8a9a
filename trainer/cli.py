"""``tessera train | sample | export``; also ``python -m trainer.cli`` for launched ranks."""

from __future__ import annotations

import argparse

from tessera.cli_args import add_config_args


def add_commands(sub, make_hooks=None) -> None:
    """Register the trainer's subcommands; ``make_hooks(cfg) -> TrainHooks`` adds in-training evaluation."""
    p = sub.add_parser("train", help="train a diffusion model under DeepSpeed ZeRO",
                       description="Train a latent DiT/MMDiT/UNet with frozen text encoders under DeepSpeed ZeRO. "
                                   "Resumes from the newest complete checkpoint by default (train.resume=auto).")
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="spawn N local ranks (CPU: gloo, CUDA: one GPU each)")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print per-rank model-state memory for the configured model, ZeRO stage and world size")
    p.add_argument("--world-size", type=int, default=None, help="world size for --estimate-memory (default: --nproc)")
    p.set_defaults(func=cmd_train, make_hooks=make_hooks)

    s = sub.add_parser("sample", help="sample an image grid from a checkpoint or an export",
                       description="Generate one image per prompt and tile them into a grid PNG. "
                                   "Uses the EMA weights unless --raw is given.")
    s.add_argument("--checkpoint", required=True, help="training checkpoint dir, run dir, or export dir (local or s3://)")
    s.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    s.add_argument("--height", type=int, default=None, help="pixels (default: the training grid size)")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels in [LO, HI] (0 clean .. 1 noise); default: the checkpoint's")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m | euler | euler_discrete | edm_heun")
    s.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--out", required=True, help="output PNG path")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("export", help="export EMA and raw weights as safetensors + config.json",
                       description="Write <out>/ema and <out>/raw (model.safetensors + config.json, no pickles) and "
                                   "<out>/tessera.json with the text encoder, autoencoder and objective needed to sample.")
    e.add_argument("--checkpoint", required=True, help="training checkpoint dir or run dir")
    e.add_argument("--out", required=True, help="output directory (local or s3://)")
    e.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    """``tessera train``."""
    from tessera.cli_args import load_from_args
    from tessera.trainer.config import TrainJobConfig

    cfg = load_from_args(TrainJobConfig, args)
    if args.estimate_memory:
        from tessera.trainer.memory import report

        print(report(cfg, args.world_size or args.nproc))
        return 0
    if args.nproc > 1:
        from tessera.trainer.launch import spawn_local

        argv = ["train"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        return spawn_local(argv, args.nproc)
    from tessera.trainer.loop import train

    return train(cfg, args.make_hooks(cfg) if args.make_hooks else None)


def cmd_sample(args: argparse.Namespace) -> int:
    """``tessera sample``."""
    from tessera.trainer.inference import sample_from

    sample_from(args.checkpoint, args.prompt, out=args.out, height=args.height, width=args.width, steps=args.steps,
                cfg_scale=args.cfg, seed=args.seed, sampler=args.sampler, use_ema=not args.raw,
                guidance_interval=args.guidance_interval)
    print(args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``tessera export``."""
    from tessera.trainer.export import export

    print(export(args.checkpoint, args.out))
    return 0
