"""Every command's ``--help``: an example that runs (real keys, through the strict loader); missing required
fields are errors that name the key, never a Python exception; ``python -m tessera`` works."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from tests.tessera import command_lines


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, parser) for every command under ``parser``."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            yield (*prefix, name), sub
            yield from _commands(sub, (*prefix, name))


def _config_commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    from tessera.cli import build_parser

    return [(w, p) for w, p in _commands(build_parser())
            if any(a.dest == "overrides" for a in p._actions) and any(a.dest == "config" for a in p._actions)]


CONFIG_COMMANDS = [" ".join(w) for w, _ in _config_commands()]


def test_every_config_command_is_found():
    assert {"train", "finetune", "eval", "data ingest", "data precompute", "data recaption"} <= set(CONFIG_COMMANDS)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_help_example_runs_through_the_strict_loader(command):
    parser = dict((" ".join(w), p) for w, p in _config_commands())[command]
    help_text = parser.format_help()
    assert "example: tessera " + command in " ".join(help_text.split()), help_text
    line = parser.epilog.removeprefix("example: ")
    overrides = [w for w in line.split() if "=" in w]
    assert overrides and all(o in " ".join(help_text.split()) for o in overrides)  # shown in the KEY=VALUE help
    command_lines.check(line)


def test_a_wrong_key_in_an_example_would_fail():
    """The check is real: a key that does not exist is refused, naming it."""
    with pytest.raises(AssertionError, match="model.depth"):
        command_lines.check("tessera train --config configs/train/tiny_dit.yaml model.depth=12")


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_a_missing_required_key_is_named_never_a_python_error(command, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    rc, err = command_lines._run_main([*command.split(), "--config", str(empty), "--dry-run"])
    assert "Traceback" not in err and "TypeError" not in err
    assert rc == 0 or (rc == 2 and err.startswith("tessera: error: ") and "missing required key '" in err), err


def test_train_dry_run_without_a_config_names_the_missing_key():
    rc, err = command_lines._run_main(["train", "--dry-run"])
    assert rc == 2 and "missing required key 'data.path'" in err and "TypeError" not in err


def test_deepspeed_extra_is_checked_by_deepspeed_at_dry_run_and_stdout_stays_yaml(capsys):
    from tessera.cli import main

    base = ["train", "--dry-run", "--config", "configs/train/tiny_dit.yaml", "deepspeed.stage=3"]
    rc = main([*base, "deepspeed.extra.zero_optimization.offload_param={device: nvme, nvme_path: /nvme}"])
    out = capsys.readouterr().out
    assert rc == 0 and yaml.safe_load(out)["deepspeed"]["extra"]["zero_optimization"]["offload_param"]["device"] \
        == "nvme"
    assert main([*base, "deepspeed.extra.zero_optimisation.stage=3"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.extra: DeepSpeed" in err and "zero_optimisation" in err


def test_python_dash_m_tessera():
    out = subprocess.run([sys.executable, "-m", "tessera", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("tessera ")
