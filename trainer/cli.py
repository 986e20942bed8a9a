"""``tessera train | sample | export | import``; also ``python -m trainer.cli`` for launched ranks."""

from __future__ import annotations

import argparse

from tessera.cli_args import add_config_args


def add_commands(sub, make_hooks=None) -> None:
    """Register the trainer's subcommands; ``make_hooks(cfg) -> TrainHooks`` adds in-training evaluation."""
    p = sub.add_parser("train", help="train a diffusion model under DeepSpeed ZeRO",
                       description="Train a latent DiT/MMDiT/UNet with frozen text encoders under DeepSpeed ZeRO. "
                                   "Resumes from the newest complete checkpoint by default (train.resume=auto).")
    add_config_args(p, example="tessera train --config configs/train/tiny_dit.yaml optim.lr=3e-4 "
                               "train.total_samples=20000 deepspeed.stage=3")
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
    s.add_argument("--sampler", default=None,
                   help="ddpm | ddim | dpmpp_2m | euler | euler_discrete | edm_heun | euler_uniform | lcm")
    s.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--control", action="append", default=None, metavar="IMAGE",
                   help="control models: the condition image (e.g. a Canny edge map) for every prompt, or repeat it "
                        "once per prompt; the sample size defaults to the image's")
    s.add_argument("--control-scale", type=float, default=None, metavar="S",
                   help="conditioning scale of the control branch (default: the checkpoint's model.control.scale; "
                        "0: the base model)")
    s.add_argument("--out", required=True, help="output PNG path")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("export", help="export EMA and raw weights (Tessera format) or a diffusers folder",
                       description="tessera format: <out>/ema and <out>/raw (model.safetensors + config.json, no "
                                   "pickles) and <out>/tessera.json with the text encoder, autoencoder and objective "
                                   "needed to sample. diffusers format: <out>/transformer (or unet) that the matching "
                                   "diffusers class loads, and a whole pipeline (model_index.json, scheduler, text "
                                   "encoder, tokenizer, VAE) when diffusers knows the encoder and autoencoder.")
    e.add_argument("--checkpoint", required=True, help="training checkpoint dir or run dir (diffusers: or an export)")
    e.add_argument("--out", required=True, help="output directory (local or s3://; diffusers: local)")
    e.add_argument("--format", choices=["tessera", "diffusers"], default="tessera")
    e.add_argument("--components", choices=["path", "copy"], default="path",
                   help="carry the text encoder and VAE by path (resolved, never an alias; diffusers: symlinks) "
                        "or by copy into the export")
    e.add_argument("--raw", action="store_true", help="diffusers: export the raw (non-EMA) weights")
    e.set_defaults(func=cmd_export)

    _add_import(sub)


def _add_import(sub) -> None:
    """Register ``tessera import``."""
    i = sub.add_parser("import", help="map published weights onto a Tessera model (PixArt, SD3, SD UNet, DiT)",
                       description="Read a diffusers model folder or pipeline root (PixArt-alpha/Sigma, SD3/SD3.5, "
                                   "SD/SDXL UNet), an original DiT .pt/.safetensors, or a Tessera export/checkpoint; "
                                   "write <out>/model.safetensors + config.json and print the model: section that "
                                   "trains from it (model.init_from). Never contacts the hub.")
    i.add_argument("source", help="local folder or file")
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--non-strict", action="store_true",
                   help="load what fits and keep fresh weights for the rest (default: any unmapped, missing or "
                        "mis-shaped key is an error listing them all)")
    i.add_argument("--keep-sigma", action="store_true", help="keep a learned-variance output half (PixArt, DiT)")
    i.add_argument("--text-dim", type=int, default=None, help="original DiT: width of the text encoder to train with "
                                                              "(default 4096, T5-XXL)")
    i.add_argument("--num-heads", type=int, default=None, help="original DiT: heads (default: DiT's size table)")
    i.add_argument("--raw", action="store_true", help="Tessera source: the raw (non-EMA) weights")
    i.add_argument("--config", default=None, metavar="FILE",
                   help="a training config: write <out> as a Tessera export with its text encoder, autoencoder, "
                        "objective and sampler, so `tessera sample` and `tessera eval` can use the base model")
    i.set_defaults(func=cmd_import)


def cmd_train(args: argparse.Namespace) -> int:
    """``tessera train``."""
    from tessera.cli_args import load_from_args
    from tessera.trainer.config import TrainJobConfig

    dry_run, args.dry_run = args.dry_run, False  # the trainer's dry run also says which preset fields are shadowed
    cfg = load_from_args(TrainJobConfig, args)
    if dry_run:
        from tessera.config import dump_yaml
        from tessera.trainer.memory import config_notes

        print(dump_yaml(cfg), end="")
        for note in config_notes(cfg):
            print(f"# note: {note}")
        return 0
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
                guidance_interval=args.guidance_interval, control=args.control, control_scale=args.control_scale)
    print(args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``tessera export``."""
    from tessera.trainer.export_diffusers import export_any

    print(export_any(args.checkpoint, args.out, fmt=args.format, components=args.components, use_ema=not args.raw))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """``tessera import``."""
    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.convert import import_model

    job = load_config(TrainJobConfig, args.config) if args.config else None
    section = import_model(args.source, args.out, strict=not args.non_strict, job=job, keep_sigma=args.keep_sigma,
                           text_dim=args.text_dim, num_heads=args.num_heads, use_ema=not args.raw)
    print(f"# wrote {args.out}; train from it with this model section:\n{section}", end="")
    return 0
