"""``tessera data recaption``: joins the ``data`` command group through the hook ``tessera.cli`` wires in.

``data_pipeline`` sits below ``recaption`` and never imports it; the top-level CLI hands this function to
``data_pipeline.cli.add_commands``, which calls it with the group's subparsers. Nothing heavy is imported here.
"""

from __future__ import annotations

import argparse

from tessera.cli_args import add_config_args


def _recaption(args: argparse.Namespace) -> int:
    """Run or resume a recaption from a config file plus overrides."""
    # Imported here: the recaption modules import torch and Ray, which `tessera --help` must not pay for.
    from tessera.recaption.run import recaption_command

    return recaption_command(args)


def add_recaption_command(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``tessera data recaption`` (``--config``, ``--dry-run``, dotted overrides)."""
    p = data_subparsers.add_parser("recaption", help="derived dataset with VLM (or measured) captions added as "
                                                     "caption variants, filtered, with provenance")
    add_config_args(p, required=True, example="tessera data recaption --config configs/recaption/attributes.yaml "
                                              "source=runs/data/tiny output=runs/data/tiny_attributes")
    p.set_defaults(func=_recaption)
