"""``tessera submit`` and ``tessera jobs`` (heavy imports happen inside the commands)."""

from __future__ import annotations

import argparse
import sys

_BACKENDS = ("slurm", "ray", "k8s")


def _submit_options(p: argparse.ArgumentParser) -> None:
    """The options of ``tessera submit`` (defined twice, see ``_cmd_submit``)."""
    p.add_argument("--config", "-c", metavar="FILE", help="the stage's YAML config")
    p.add_argument("--backend", choices=_BACKENDS, default=None, help="default: cluster.backend (slurm)")
    p.add_argument("--cluster", metavar="FILE", default=None,
                   help="cluster config (configs/cluster/*.yaml); cluster.KEY=VALUE overrides it")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--time", default=None, help="wall time, e.g. 04:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--after", metavar="JOB", default=None,
                   help="start after JOB (a Tessera job id, or a Slurm job id) succeeds; cancelled if it fails")
    p.add_argument("--array", type=int, metavar="N", default=None, help="data stages on Slurm: N array tasks")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR", help="passed to the stage (eval)")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would be submitted and exit")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``tessera submit`` and ``tessera jobs``."""
    p = sub.add_parser(
        "submit", help="submit any stage to Slurm, Ray or Kubernetes",
        usage="tessera submit STAGE --config FILE [KEY=VALUE ...] [--backend slurm|ray|k8s] [options]",
        description="Validate the stage's config (its --dry-run), stage the resolved config, render an sbatch "
                    "script, a Ray job request or Kubernetes manifests, submit it and record the job. "
                    "KEY=VALUE overrides the stage's config; cluster.KEY=VALUE overrides the cluster config. "
                    "Secrets are never written: list their names in cluster.secrets.")
    _submit_options(p)
    # Everything from the stage words on; parsed again, intermixed, in _cmd_submit (argparse cannot take
    # "data ingest --config F k=v" with positionals on both sides of the options).
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="STAGE [KEY=VALUE ...]")
    p.set_defaults(func=_cmd_submit)

    j = sub.add_parser("jobs", help="list, follow, and cancel submitted jobs",
                       description="Read the job records under cluster.state_dir (~/.tessera/jobs by default) "
                                   "and ask the scheduler for the live state; works without Slurm accounting.")
    j.set_defaults(_group_parser=j)
    jsub = j.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND", parser_class=type(j))
    for name, help_ in (("ls", "every job with its state"), ("status", "a job's state and attempts"),
                        ("logs", "an attempt's log"), ("cancel", "stop a job for good")):
        q = jsub.add_parser(name, help=help_)
        q.add_argument("--state-dir", default=None, help="default: $TESSERA_STATE_DIR or ~/.tessera/jobs")
        q.add_argument("--cluster", metavar="FILE", default=None, help="read state_dir from this cluster config")
        if name != "ls":
            q.add_argument("job", metavar="JOB", help="tessera job id, scheduler job id, or a unique prefix")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="follow through requeues until the job ends")
            q.add_argument("--attempt", type=int, default=None, metavar="K", help="attempt K (default: the latest)")
        else:
            q.add_argument("--json", action="store_true", help="machine-readable output (the job records)")
        q.set_defaults(func=_cmd_jobs)


def _scheduler_errors(fn):
    """A scheduler's refusal (sbatch, the Ray Jobs API, kubectl) is a one-line error and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        """The wrapped command."""
        from tessera.cluster.backend import BackendError

        try:
            return fn(args)
        except BackendError as e:
            print(f"tessera: error: {e}", file=sys.stderr)
            return 1

    run.__doc__ = fn.__doc__
    return run


@_scheduler_errors
def _cmd_submit(args: argparse.Namespace) -> int:
    """``tessera submit``."""
    from tessera.cluster.submit import SubmitRequest, submit
    from tessera.config import ConfigError

    inner = argparse.ArgumentParser(prog="tessera submit", add_help=False)
    _submit_options(inner)
    inner.add_argument("words", nargs="*")
    rest, unknown = inner.parse_known_intermixed_args(args.argv)
    if unknown:
        raise ConfigError(f"tessera submit: unrecognized arguments: {' '.join(unknown)}")
    merged = {k: (getattr(rest, k) if getattr(rest, k) not in (None, [], False) else getattr(args, k))
              for k in vars(rest) if k != "words"}
    stage = [w for w in rest.words if "=" not in w]
    overrides = [w for w in rest.words if "=" in w]
    if not stage or not merged["config"]:
        raise ConfigError("usage: tessera submit STAGE --config FILE [KEY=VALUE ...] (STAGE: train, data ingest, ...)")
    flags = {k: merged[k] for k in ("backend", "nodes", "gpus_per_node", "time", "partition", "account")}
    req = SubmitRequest(stage=stage, config=merged["config"], overrides=overrides, cluster_file=merged["cluster"],
                        flags=flags, after=merged["after"], array=merged["array"], checkpoints=merged["checkpoint"],
                        dry_run=merged["dry_run"])
    return submit(req)


@_scheduler_errors
def _cmd_jobs(args: argparse.Namespace) -> int:
    """``tessera jobs SUBCOMMAND``."""
    from tessera.cluster import jobs
    from tessera.cluster.config import load_cluster_config, state_path
    from tessera.cluster.records import JobStore

    if args.cluster and not args.state_dir:
        store = JobStore(load_cluster_config(args.cluster, []).state_path)
    else:
        store = JobStore(state_path(args.state_dir))
    if args.jobs_command == "ls":
        return jobs.ls(store, as_json=args.json)
    if args.jobs_command == "status":
        return jobs.status(store, args.job, as_json=args.json)
    if args.jobs_command == "logs":
        return jobs.logs(store, args.job, args.attempt, args.follow)
    return jobs.cancel(store, args.job, as_json=args.json)
