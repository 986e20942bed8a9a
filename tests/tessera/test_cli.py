"""The `tessera` command: help, --dry-run, and exit code 2 with a clear message for bad configs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def tessera(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_lists_every_stage_with_a_purpose():
    out = tessera("--help")
    assert out.returncode == 0
    for cmd in ("data", "train", "sample", "export"):
        line = next(l for l in out.stdout.splitlines() if l.strip().startswith(cmd + " "))
        assert len(line.split(None, 1)[1]) > 10, f"{cmd} has no one-line purpose"
    sub = tessera("data", "--help")
    assert sub.returncode == 0 and all(c in sub.stdout for c in ("ingest", "inspect", "verify"))
    opts = tessera("train", "--help")
    assert opts.returncode == 0 and all(o in opts.stdout for o in ("--config", "--dry-run", "--nproc", "--estimate-memory"))


@pytest.mark.parametrize("cmd,config", [(["data", "ingest"], "configs/data/emoji.yaml"),
                                        (["train"], "configs/train/tiny_dit.yaml")])
def test_dry_run_prints_resolved_config_with_overrides(cmd, config):
    override = "samples_per_shard=7" if cmd[0] == "data" else "optim.lr=0.0003"
    out = tessera(*cmd, "--config", config, "--dry-run", override)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# config_hash: ")
    resolved = yaml.safe_load(out.stdout)
    if cmd[0] == "data":
        assert resolved["samples_per_shard"] == 7 and resolved["sources"][0]["name"] == "emoji"
    else:
        assert resolved["optim"]["lr"] == 0.0003 and resolved["model"]["name"] == "dit"


def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: [{ROOT / 'configs/data/emoji.yaml'}]\nsamples_per_shrad: 5\n")
    out = tessera("data", "ingest", "--config", str(bad))
    assert out.returncode == 2
    assert "samples_per_shrad" in out.stderr and str(bad) in out.stderr and "samples_per_shard" in out.stderr


def test_unknown_override_key_names_closest():
    out = tessera("train", "--config", "configs/train/tiny_dit.yaml", "optim.lrr=1e-3", "--dry-run")
    assert out.returncode == 2 and "'optim.lrr'" in out.stderr and "'optim.lr'" in out.stderr


def test_wrong_type_names_key_and_expected_type():
    out = tessera("train", "--config", "configs/train/tiny_dit.yaml", "train.total_samples=lots", "--dry-run")
    assert out.returncode == 2 and "'train.total_samples'" in out.stderr and "expects int" in out.stderr
    out = tessera("train", "--config", "configs/train/tiny_dit.yaml", "deepspeed.stage=5", "--dry-run")
    assert out.returncode == 2 and "'deepspeed.stage'" in out.stderr and "one of 'auto', 1, 2, 3" in out.stderr


def test_missing_config_file_names_path(tmp_path):
    out = tessera("data", "ingest", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and str(tmp_path / "nope.yaml") in out.stderr


def test_group_without_subcommand_and_unknown_command_exit_2():
    assert tessera("data").returncode == 2
    bad = tessera("trian")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
