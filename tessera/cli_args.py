"""The shared ``--config FILE [key=value ...] [--dry-run]`` arguments of every stage command."""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

from tessera.config import dump_yaml, load_config

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Add ``--config``, ``--dry-run`` and positional dotted overrides to a stage command."""
    parser.add_argument("--config", "-c", metavar="FILE", required=required,
                        help="YAML config (may extend others with 'base: [a.yaml, ...]')")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit 0")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides parsed by the field's type, e.g. train.lr=1e-4 model.depth=12")


def load_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Resolve the typed config from ``args``; on ``--dry-run`` print it and exit 0."""
    cfg = load_config(cls, args.config, args.overrides)
    if getattr(args, "dry_run", False):
        sys.stdout.write(dump_yaml(cfg))
        sys.stdout.flush()
        raise SystemExit(0)
    return cfg
