"""The package graph points one way (import-linter contracts in pyproject.toml), and the packaging lists every
package folder.

The repository keeps one folder per stage (``trainer/``, ``evaluation/``, ...) and maps them under the
``tessera`` namespace with setuptools' ``package-dir``. import-linter (grimp) finds a package's modules by
walking its directory, so it cannot follow that mapping: the test copies the sources into the installed
layout (``<tmp>/tessera/trainer/...``) and lints that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def installed_layout(dest: Path) -> Path:
    """Copy every mapped package folder to where a wheel installs it; returns ``dest``."""
    for name, folder in sorted(_setuptools()["package-dir"].items()):
        target = dest.joinpath(*name.split("."))
        src = ROOT / folder
        for path in src.rglob("*.py"):
            rel = path.relative_to(src)
            if rel.parts[0] in {n.split(".")[1] for n in _setuptools()["package-dir"] if n.count(".") == 1} \
                    and name == "tessera":
                continue  # a nested mapped package is copied from its own folder
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
    return dest


def test_import_graph_follows_the_layers(tmp_path: Path) -> None:
    installed_layout(tmp_path / "src")
    shutil.copyfile(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "src"))
    res = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in res.stdout, res.stdout[-3000:]


def test_packaging_lists_every_package_folder() -> None:
    cfg = _setuptools()
    listed = set(cfg["packages"])
    found = set()
    for name, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    nested = {n for n in cfg["package-dir"] if n != "tessera"}
    found = {f for f in found if not (f.startswith("tessera.") and f.split(".")[1] in {n.split(".")[1] for n in nested}
                                      and not any(f == n or f.startswith(n + ".") for n in nested))}
    assert found == listed, f"pyproject packages differ: missing {sorted(found - listed)}, extra {sorted(listed - found)}"
