"""A non-editable install works: the wheel holds every stage under the ``tessera`` namespace (no top-level
``trainer``/``evaluation``/... modules) and the shipped configs, and its ``tessera`` command runs from any
directory, resolving ``--config configs/...`` from the installed package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the bin dir of a fresh venv where only that wheel is installed; dependencies are borrowed
    from this venv's site-packages through a .pth line, which does not run this venv's editable finder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the source files: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next((tmp / "dist").glob("tessera-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return wheel, venv / "bin"


@pytest.mark.slow
def test_wheel_installs_under_the_tessera_namespace_with_configs(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tessera"}, tops  # no top-level trainer/...
    assert "tessera/trainer/loop.py" in names and "tessera/evaluation/fid.py" in names
    assert "tessera/configs/train/tiny_dit.yaml" in names and "tessera/configs/quickstart/train.yaml" in names
    assert "tessera/evaluation/prompts_builtin.txt" in names


@pytest.mark.slow
def test_installed_command_runs_outside_the_repository(installed, tmp_path):
    _, bin_dir = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *a: subprocess.run([str(bin_dir / "tessera"), *a], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=300)
    out = run("--help")
    assert out.returncode == 0 and "quickstart" in out.stdout and "train" in out.stdout, out.stderr[-2000:]
    out = run("train", "--config", "configs/train/tiny_dit.yaml", "--dry-run", "optim.lr=3e-4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lr: 0.0003" in out.stdout
    where = subprocess.run([str(bin_dir / "python"), "-c", "import tessera.trainer.loop as m; print(m.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0 and str(bin_dir.parent) in where.stdout, where.stdout + where.stderr


def test_the_quickstarts_stages_run_from_the_packaged_configs_outside_the_repository(installed, tmp_path):
    """From the installed wheel, in an unrelated directory: a real ingest from configs/quickstart/data.yaml (24
    emoji, in-process), then the recaption, precompute and train stages of the quickstart resolve on it."""
    _, bin_dir = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*a):
        out = subprocess.run([str(bin_dir / "tessera"), *a], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"tessera {' '.join(a)}: {out.stderr[-3000:]}"
        return out

    ingest = tmp_path / "ingest"
    run("data", "ingest", "--config", "configs/quickstart/data.yaml", f"output={ingest}", "executor=local",
        "sources=[{name: emoji, limit: 24}]")
    assert (ingest / "manifest.json").exists() and list((ingest / "shards").glob("*.tar"))
    run("data", "recaption", "--config", "configs/quickstart/recaption.yaml", f"source={ingest}",
        f"output={tmp_path / 'attrs'}", "--dry-run")
    run("data", "precompute", "--config", "configs/quickstart/precompute.yaml", f"source={ingest}",
        f"output={tmp_path / 'emb'}", "--dry-run")
    out = run("train", "--config", "configs/quickstart/train.yaml", f"data.path={ingest}", "--dry-run")
    assert "every_logs: 1" in out.stdout  # the quickstart's own train config, as packaged
