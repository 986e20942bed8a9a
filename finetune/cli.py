"""``tessera finetune`` (and ``tessera merge-lora``); also the entry of ranks launched with ``--nproc``."""

from __future__ import annotations

import argparse

from tessera.cli_args import add_config_args


def add_commands(sub) -> None:
    """Register the fine-tuning subcommands."""
    p = sub.add_parser("finetune", help="align a trained checkpoint to a reward or preference pairs (DDPO, GRPO, "
                                        "DPO, DRaFT), LoRA by default",
                       description="Fine-tune a training run, checkpoint or export with a preference-reward method "
                                   "under DeepSpeed. The run directory is a training run's; `tessera sample`, "
                                   "`export` and `eval` read its checkpoints. Resumes by default (train.resume=auto).")
    add_config_args(p, example="tessera finetune --config configs/finetune/grpo.yaml --checkpoint "
                               "runs/quickstart/runs/train train.updates=20 method.grpo.kl_beta=0.04")
    p.add_argument("--checkpoint", default=None, help="the base: training run, checkpoint or export dir (local or "
                                                      "s3://); same as checkpoint=...")
    p.add_argument("--nproc", type=int, default=1, help="spawn N local ranks (CPU: gloo, CUDA: one GPU each)")
    p.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge-lora", help="merge a PEFT LoRA adapter into a base checkpoint and export the result",
                       description="Apply <adapter>/adapter_model.safetensors (+ adapter_config.json, PEFT's format, "
                                   "e.g. a fine-tuning checkpoint's lora/ folder) to a base checkpoint or export and "
                                   "write an export (`tessera sample/eval` read it).")
    m.add_argument("--base", required=True, help="training run, checkpoint or export dir")
    m.add_argument("--adapter", required=True, help="folder with adapter_model.safetensors + adapter_config.json")
    m.add_argument("--out", required=True, help="output export directory (local or s3://)")
    m.add_argument("--raw", action="store_true", help="merge into the base's raw weights instead of its EMA")
    m.set_defaults(func=cmd_merge)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``tessera finetune``."""
    from tessera.cli_args import load_from_args
    from tessera.finetune.config import FinetuneJobConfig

    if args.checkpoint:
        args.overrides = [*args.overrides, f"checkpoint={args.checkpoint}"]
    cfg = load_from_args(FinetuneJobConfig, args)
    if args.nproc > 1:
        from tessera.trainer.launch import spawn_local

        argv = ["finetune"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        return spawn_local(argv, args.nproc)
    from tessera.finetune.loop import finetune

    return finetune(cfg)


def cmd_merge(args: argparse.Namespace) -> int:
    """``tessera merge-lora``."""
    from tessera.finetune.merge import merge_adapter

    print(merge_adapter(args.base, args.adapter, args.out, use_ema=not args.raw))
    return 0
