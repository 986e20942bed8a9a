"""Checking ``tessera ...`` command lines quoted in docs, config comments and ``--help`` examples.

A line is parsed by tessera's own argparse parser; when its command takes a config (``--config`` and KEY=VALUE
overrides), the command itself runs with ``--dry-run`` in this process, so the config file and every key and
value go through the strict loader exactly as they would for a user. ``tessera submit`` lines are checked the
same way for their stage part, and through ``cluster_config`` for their cluster part.

The rule for what is skipped: a usage synopsis rather than an example, i.e. a line holding a placeholder
(``<run>``, ``STAGE``, ``FILE``, ``JOB``, ``N``), an optional part in ``[...]`` or alternatives ``a|b``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex

PLACEHOLDER = re.compile(r"<[^>]*>|\[|\]|\||(?<![\w.=/-])[A-Z][A-Z_]*(?![\w.=/-])|\.\.\.")


def is_synopsis(line: str) -> bool:
    """True for a usage synopsis (placeholders, ``[...]``, ``a|b``), which is skipped."""
    return bool(PLACEHOLDER.search(line))


def command_lines(text: str) -> list[tuple[str, str | None]]:
    """(line, expected error) of every ``tessera ...`` line of a text: in code blocks or ``#`` comments (``$ ``
    prompts and trailing comments dropped, ``\\`` continuations joined, ``&&`` chains split), and inline code
    spans that give ``--config`` a file. A line followed by a ``tessera: error: ...`` line is an example of that
    error, which the check then expects."""
    out: dict[str, str | None] = {}
    lines = re.sub(r"\\\n\s*#?\s*", " ", text).splitlines()
    for i, raw in enumerate(lines):
        line = raw.strip().lstrip("#").strip().removeprefix("$ ").strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        expected = nxt.removeprefix("tessera: error: ") if nxt.startswith("tessera: error: ") else None
        for part in line.split("&&"):
            part = part.split("  #")[0].split(" # ")[0].strip()
            if part.startswith("tessera ") and not part.startswith("tessera:"):
                out[part] = expected
    for span in re.findall(r"`(tessera [^`]+)`", text):
        if re.search(r"--config[ =]\S", span):
            out.setdefault(span.strip(), None)
    return list(out.items())


def _run_main(words: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``tessera WORDS`` run in this process."""
    from tessera.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(words)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return int(rc or 0), err.getvalue()


def check(line: str, expected_error: str | None = None) -> None:
    """Raise AssertionError naming the line when it does not parse or its config does not load (or, given
    ``expected_error``, when it does not fail with exactly that message). A ``--config`` outside ``configs/``
    (a user's own file, a run's output) is parsed but not loaded."""
    words = shlex.split(line)[1:]
    from tessera.cli import build_parser

    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(words)
        except SystemExit as e:
            if e.code == 0:  # --help, --version
                return
            raise AssertionError(f"{line!r} does not parse: {err.getvalue().strip()}") from None
    config = getattr(args, "config", None)
    if words and words[0] == "submit":
        _check_submit(line, args)
    elif config is not None and hasattr(args, "overrides") and str(config).startswith("configs/"):
        rc, msg = _run_main([*words, "--dry-run"])
        if expected_error is not None:
            assert rc == 2 and msg.strip() == f"tessera: error: {expected_error}", f"{line!r}: {msg.strip()}"
            return
        assert rc == 0, f"{line!r}: {msg.strip()[-2000:]}"
    assert expected_error is None, f"{line!r}: documented to fail with {expected_error!r}, and it was not run"


def _check_submit(line: str, args) -> None:
    """The stage part through the stage's own dry run, the cluster part through ``cluster_config``."""
    import argparse

    from tessera.cluster.cli import _submit_options
    from tessera.cluster.submit import SubmitRequest, cluster_config

    inner = argparse.ArgumentParser(add_help=False)
    _submit_options(inner)
    inner.add_argument("words", nargs="*")
    rest, unknown = inner.parse_known_intermixed_args(args.argv)
    assert not unknown, f"{line!r}: unrecognized arguments {unknown}"
    config = rest.config or args.config
    if not str(config).startswith("configs/"):
        return
    stage = [w for w in rest.words if "=" not in w]
    overrides = [w for w in rest.words if "=" in w]
    assert stage and config, f"{line!r}: no stage or --config"
    stage_ovs = [o for o in overrides if not o.startswith("cluster.")]
    checkpoints = [a for c in (rest.checkpoint or args.checkpoint) for a in ("--checkpoint", c)]
    rc, msg = _run_main([*stage, "--config", config, *checkpoints, *stage_ovs, "--dry-run"])
    assert rc == 0, f"{line!r}: {msg.strip()[-2000:]}"
    flags = {k: getattr(rest, k) or getattr(args, k)
             for k in ("backend", "nodes", "gpus_per_node", "time", "partition", "account")}
    cluster_config(SubmitRequest(stage=stage, config=config, overrides=overrides, flags=flags,
                                 cluster_file=rest.cluster or args.cluster))
