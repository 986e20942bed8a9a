"""``tessera``: the one console command that fronts every stage.

Each stage package contributes its subcommands through ``<pkg>/cli.py:add_commands(subparsers)``;
those modules import nothing heavy, so ``tessera --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tessera import __version__
from tessera.config import ConfigError
from tessera.registry import RegistryError

# Order is the pipeline's order: data_pipeline -> recaption -> trainer -> evaluation -> cluster.
_COMMAND_MODULES = ["tessera.data_pipeline.cli", "tessera.trainer.cli", "tessera.evaluation.cli", "tessera.quickstart.cli",
                    "tessera.cluster.cli", "tessera.finetune.cli", "tessera.distill.cli"]


def _train_hooks(cfg):
    """In-training evaluation lives in ``evaluation``, above the trainer: the CLI builds it for the loop."""
    from tessera.evaluation.in_training import training_hooks

    return training_hooks(cfg)


def _recaption_command(data_subparsers) -> None:
    """``tessera data recaption`` joins the ``data`` group; ``data_pipeline`` sits below ``recaption``."""
    from tessera.recaption.cli import add_recaption_command

    add_recaption_command(data_subparsers)


# Keyword arguments a stage's ``add_commands`` takes from the top of the graph.
_WIRING = {"tessera.trainer.cli": {"make_hooks": _train_hooks},
           "tessera.data_pipeline.cli": {"data_commands": [_recaption_command]}}

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors exit with code 2 and a one-line message (argparse's own convention)."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``tessera`` parser with every available stage's subcommands."""
    parser = _Parser(
        prog="tessera",
        description="Tessera: train text-to-image diffusion models, from raw image-text pairs to evaluated checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for modname in _COMMAND_MODULES:
        importlib.import_module(modname).add_commands(sub, **_WIRING.get(modname, {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tessera`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # A command group without a subcommand (``tessera data``) prints its help.
        target = getattr(args, "_group_parser", parser)
        target.print_help()
        return EXIT_USAGE if args.command else 0
    from tessera.log import setup_logging

    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, RegistryError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"tessera: error: file not found: {e.filename or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        logging.getLogger("tessera").warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
