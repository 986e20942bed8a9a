"""Training on a Ray cluster: the driver of a Ray job runs the stage through Ray Train's ``TorchTrainer``.

``python -m tessera.cluster.ray_train --workers N [--use-gpu on|off|auto] [--cpus-per-worker C]
[--resource NAME=AMOUNT ...] [--placement-strategy PACK] -- train --config config.yaml [KEY=VALUE ...]`` loads the
config exactly as ``tessera train`` would and calls the trainer's Ray Train entry point
(``tessera.trainer.launch.run_on_ray``) with in-training evaluation wired as the CLI wires it. The driver's
exit code follows the preemption contract: 0 done, 75 when a worker checkpointed and exited 75, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tessera.config import ConfigError, load_config

log = logging.getLogger("tessera.cluster")
EXIT_PREEMPTED = 75


def exit_code(error: BaseException | None) -> int:
    """0 for a finished fit, 75 when the failure chain holds a worker's ``SystemExit(75)``, else 1."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SystemExit) and error.code == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        if f"SystemExit: {EXIT_PREEMPTED}" in str(error):  # a remote traceback flattened into a message
            return EXIT_PREEMPTED
        error = error.__cause__ or error.__context__
    return 0 if not seen else 1


def _resource(text: str) -> tuple[str, float]:
    """``NAME=AMOUNT`` -> (name, amount)."""
    name, sep, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = None
    if not (sep and name and value is not None):
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None):
    """The driver's arguments: how the Ray Train workers are placed, then the stage's command line."""
    p = argparse.ArgumentParser(prog="python -m tessera.cluster.ray_train")
    p.add_argument("--workers", type=int, required=True, help="Ray Train workers (one rank each)")
    p.add_argument("--use-gpu", choices=("on", "off", "auto"), default="auto",
                   help="one GPU per worker; auto: when the Ray cluster has GPUs")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--resource", type=_resource, action="append", default=[], metavar="NAME=AMOUNT",
                   help="another per-worker resource (repeatable)")
    p.add_argument("--placement-strategy", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), default="PACK")
    p.add_argument("stage", nargs=argparse.REMAINDER, help="-- train --config FILE [KEY=VALUE ...]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the Ray job's driver."""
    from tessera.log import setup_logging

    args = parse_args(argv)
    rest = args.stage[1:] if args.stage[:1] == ["--"] else args.stage
    setup_logging("INFO")
    if rest[:1] != ["train"] or "--config" not in rest:
        print(f"ray_train: expected 'train --config FILE [KEY=VALUE ...]', got {rest}", file=sys.stderr)
        return 2
    i = rest.index("--config")
    config, overrides = rest[i + 1], rest[1:i] + rest[i + 2:]
    from tessera.evaluation.in_training import training_hooks
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.launch import RayScaling, run_on_ray

    try:
        cfg = load_config(TrainJobConfig, config, overrides)
    except ConfigError as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    scaling = RayScaling(workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                         resources=dict(args.resource), placement_strategy=args.placement_strategy)
    result = run_on_ray(cfg, scaling, make_hooks=training_hooks)
    code = exit_code(result.error)
    log.info("Ray Train finished: exit code %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
