"""``tessera data {ingest,precompute,condition,inspect,verify}``; heavy imports happen inside the command functions."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from tessera.cli_args import add_config_args, load_from_args


def _ingest(args: argparse.Namespace) -> int:
    """Run or resume an ingest from a config file plus overrides."""
    from tessera.data_pipeline.ingest import IngestConfig, run_ingest

    cfg = load_from_args(IngestConfig, args)
    m = run_ingest(cfg)
    t = m["totals"]
    print(f"ingested {t['input']} inputs -> {t['written']} written, {t['rejected']} rejected "
          f"in {len(m['shards'])} shards at {cfg.output} ({m['timing']['samples_per_s']} samples/s)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Print a dataset's totals, reasons, bucket histogram and a few captions."""
    from tessera.data_pipeline.inspect_verify import inspect_dataset

    print(inspect_dataset(args.dir, n_captions=args.captions))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Re-hash and re-read every shard; exit 1 naming each bad shard."""
    from tessera.data_pipeline.inspect_verify import verify_dataset

    problems, summary = verify_dataset(args.dir, threads=args.threads)
    for p in problems:
        print(f"BAD {p}", file=sys.stderr)
    if problems:
        print(f"verify FAILED: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"verify OK: {summary['shards']} shards, {summary['samples']} samples in {args.dir}")
    return 0


def _precompute(args: argparse.Namespace) -> int:
    """Run or resume a precompute from a config file plus overrides."""
    # Imported here: the precompute modules import torch, which `tessera --help` must not pay for.
    from tessera.data_pipeline.precompute import precompute_command

    return precompute_command(args)


def add_precompute_command(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``tessera data precompute`` (``--config``, ``--dry-run``, dotted overrides)."""
    p = data_subparsers.add_parser("precompute", help="derived dataset with frozen text embeddings (and latents) "
                                                      "added to every sample")
    add_config_args(p, required=True, example="tessera data precompute --config configs/data/precompute_minilm.yaml "
                                              "source=runs/data/tiny output=runs/data/tiny_minilm")
    p.set_defaults(func=_precompute)


def _condition(args: argparse.Namespace) -> int:
    """Run or resume a condition job from a config file plus overrides."""
    from tessera.data_pipeline.condition import condition_command

    return condition_command(args)


def add_condition_command(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``tessera data condition`` (``--config``, ``--dry-run``, dotted overrides)."""
    p = data_subparsers.add_parser("condition", help="derived dataset with control conditions (Canny edges, soft "
                                                     "edges, colour layout, grayscale, depth, pose) per sample")
    add_config_args(p, required=True, example="tessera data condition --config configs/data/condition_canny.yaml "
                                              "source=runs/data/tiny output=runs/data/tiny_canny")
    p.set_defaults(func=_condition)


def add_commands(subparsers: argparse._SubParsersAction,
                 data_commands: Sequence[Callable[[argparse._SubParsersAction], None]] = ()) -> None:
    """Add ``tessera data`` with its ``ingest``, ``precompute``, ``condition``, ``inspect`` and ``verify`` subcommands.

    ``data_commands`` add more subcommands to the group from layers above this one (``tessera.cli`` passes
    ``recaption``'s), so the group is complete without ``data_pipeline`` importing them.
    """
    data = subparsers.add_parser("data", help="ingest image-text pairs into shards; inspect and verify them")
    data.set_defaults(_group_parser=data)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=type(data))

    p = sub.add_parser("ingest", help="sources -> processed, deduplicated, bucketed webdataset shards")
    add_config_args(p, required=True, example="tessera data ingest --config configs/data/emoji.yaml "
                                              "output=runs/data/emoji samples_per_shard=500")
    p.set_defaults(func=_ingest)

    for add in data_commands:
        add(sub)

    add_precompute_command(sub)
    add_condition_command(sub)

    p = sub.add_parser("inspect", help="print totals, reject reasons, bucket histogram and sample captions")
    p.add_argument("dir", help="dataset directory or s3:// prefix")
    p.add_argument("--captions", type=int, default=5, help="number of sample captions to show")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="re-hash every shard against the manifest and check every sample")
    p.add_argument("dir", help="dataset directory or s3:// prefix")
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(func=_verify)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m tessera.data_pipeline.cli data ingest ...`` (same as ``tessera data ...``)."""
    from tessera.log import setup_logging

    parser = argparse.ArgumentParser(prog="tessera")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        getattr(args, "_group_parser", parser).print_help()
        return 2
    setup_logging("INFO")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
