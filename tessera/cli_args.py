"""The shared ``--config FILE [key=value ...] [--dry-run]`` arguments of every stage command."""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

from tessera.config import dump_yaml, load_config

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser, required: bool = False, example: str | None = None) -> None:
    """Add ``--config``, ``--dry-run`` and positional dotted overrides to a stage command.

    ``example`` is a whole command line that uses real keys of the command's config; it is shown at the end of
    ``--help`` and its overrides in the KEY=VALUE help (tests/tessera/test_cli_help.py runs every one of them
    through the strict config loader)."""
    parser.add_argument("--config", "-c", metavar="FILE", required=required,
                        help="YAML config (may extend others with 'base: [a.yaml, ...]'); a shipped config is found "
                             "by its path under configs/ from any directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit 0 (a bad key or value exits 2 naming it)")
    overrides = [w for w in (example or "").split() if "=" in w and not w.startswith("-")]
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, each parsed by its key's type"
                             + (f", e.g. {' '.join(overrides)}" if overrides else ""))
    if example:
        parser.epilog = f"example: {example}"


def load_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Resolve the typed config from ``args``; on ``--dry-run`` print it and exit 0."""
    cfg = load_config(cls, args.config, args.overrides)
    if getattr(args, "dry_run", False):
        sys.stdout.write(dump_yaml(cfg))
        sys.stdout.flush()
        raise SystemExit(0)
    return cfg
