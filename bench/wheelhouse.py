"""The offline wheelhouse for ``bench/gpu_check.sh``: what a GPU machine's image lacks for the check, as wheels.

    python bench/wheelhouse.py build build/wheelhouse     (make wheelhouse; needs PyPI, about 2 minutes)
    python bench/wheelhouse.py check build/wheelhouse     (gpu_check.sh: is it built from this source tree?)

The GPU machines this check runs on have ``python3`` with torch, transformers, peft, safetensors, pyarrow, numpy
and pillow (and what those need), nothing else, no network, and at most 64 MiB may travel with the working tree.
So the wheelhouse holds only the rest of what the check imports, at the versions tested here:

* Tessera itself (no dependencies: its core ones include Ray and W&B, which the check does not need);
* DeepSpeed, built from its sdist without ops (``DS_BUILD_OPS=0``; they compile on first use, the check uses none
  that needs nvcc), and diffusers;
* the dependency closure of those and of the few Tessera imports on the training path (``CHECK_NEEDS``), less the
  image's (``IMAGE``, ``IMAGE_DEPS``); binary ones for each CPython in ``--pythons`` (x86_64 manylinux), pure
  ones once. ``gpu_check.sh`` asks pip for ``CHECK_NEEDS`` against the image and this wheelhouse only
  (``--no-index``), so it installs just what the image lacks, and fails naming anything missing.

``wheelhouse.json`` lists the requirements and a digest of the Tessera sources the wheel was built from; the check
refuses a wheelhouse built from other sources (run ``make wheelhouse`` again).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tomllib
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "wheelhouse.json"
LIMIT_BYTES = 64 * 2**20  # what the device tool carries with the working tree, in all
# What the GPU image has, and what those have always required (their other, newer dependencies may be missing
# there: pip installs them from the wheelhouse when the image lacks them).
IMAGE = ["torch", "transformers", "peft", "safetensors", "pyarrow", "numpy", "pillow"]
IMAGE_DEPS = ["filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec",
              "huggingface-hub", "packaging", "pyyaml", "regex", "tokenizers", "tqdm", "psutil", "accelerate"]
# What the check imports beyond the image: DeepSpeed and diffusers, and Tessera's own imports on the path of
# `tessera train` (the config and the job templates, the process/memory probe, progress bars).
CHECK_NEEDS = ["deepspeed", "diffusers", "pyyaml", "jinja2", "psutil", "tqdm"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]
# The folders the wheel is built from: pyproject's package-dir (one list, so a new stage folder cannot be missed).
SOURCES = [*dict.fromkeys(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
                          .values()), "pyproject.toml"]
_SUFFIXES = {".py", ".yaml", ".j2", ".txt", ".toml", ".json"}


def closure(names: list[str], stop: set[str] = frozenset()) -> dict[str, str]:
    """{distribution: installed version} of ``names`` and everything they require here (with the extras they
    ask of each other), not descending into ``stop`` (the image's, whose own requirements the image has)."""
    seen: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(n), "") for n in names]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in done or name in stop:
            continue
        done.add((name, extra))
        dist = md.distribution(name)  # PackageNotFoundError names a missing one: the build runs in the dev venv
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ["", *sorted(req.extras)]]
    return seen


def source_digest(root: Path = REPO) -> str:
    """sha256 over the Tessera source files (path and bytes), as the working tree holds them."""
    h = hashlib.sha256()
    files = []
    for entry in SOURCES:
        p = root / entry
        files += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES
                                          and "__pycache__" not in f.parts and ".egg-info" not in str(f)]
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"wheelhouse: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def _download(name: str, version: str, out: Path, pythons: list[str]) -> None:
    """The wheel of ``name==version``; when it is built for one CPython, one for each of ``pythons``."""
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out), f"{name}=={version}")
    if _universal(_wheels(out, name, version)):
        return  # one wheel serves every interpreter
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    for py in pythons:
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version",
             py, *plats, "-d", str(out), f"{name}=={version}")


def _tessera_wheel(out: Path) -> str:
    """Tessera's wheel, built from a copy of the sources (setuptools writes build/ and *.egg-info beside them);
    returns the digest of that copy."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for entry in [*SOURCES, "README.md", "LICENSE"]:
            p = REPO / entry
            if p.is_dir():
                shutil.copytree(p, src / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            elif p.is_file():
                (src / entry).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, src / entry)
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
        return source_digest(src)


def _wheels(out: Path, name: str, version: str) -> list[str]:
    """The file names of ``name==version``'s wheels in ``out`` (``{name}-{version}-{tags}.whl``, name escaped)."""
    want = (canonicalize_name(name), version)
    return [p.name for p in out.glob("*.whl")
            if (canonicalize_name(p.name.split("-")[0]), p.name.split("-")[1]) == want]


def _universal(names: list[str]) -> bool:
    """True when one of these wheels serves any CPython: pure Python, ``py3-none-<platform>`` or the stable ABI."""
    return any(n.endswith("-none-any.whl") or "-py3-none-" in n or "-abi3-" in n for n in names)


def _complete(names: list[str], pythons: list[str]) -> bool:
    """True when these wheels serve every interpreter: a universal one, or one per CPython of ``pythons``."""
    return _universal(names) or (bool(names) and all(any(f"-cp{py.replace('.', '')}-" in n for n in names)
                                                     for py in pythons))


def build(out: Path, pythons: list[str]) -> dict:
    """Build the wheelhouse into ``out``; wheels already there at the right version are kept (a rebuild after a
    source change only rebuilds Tessera's). Returns its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    needed = closure(CHECK_NEEDS, {canonicalize_name(n) for n in IMAGE + IMAGE_DEPS})
    keep = {w for n, v in needed.items() for w in _wheels(out, n, v)}
    for stale in [p for p in out.glob("*.whl") if p.name not in keep]:  # other versions, and Tessera's
        stale.unlink()
    for name, version in sorted(needed.items()):
        if _complete(_wheels(out, name, version), pythons):
            continue
        if name == "deepspeed":  # sdist only on PyPI: build it here, ops left to compile on first use
            env = dict(os.environ, DS_BUILD_OPS="0", DS_BUILD_STRING="")
            _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), f"deepspeed=={version}",
                 env=env)
        else:
            _download(name, version, out, pythons)
    digest = _tessera_wheel(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    manifest = {"install": [f"{n}=={needed[n]}" if n in needed else n for n in CHECK_NEEDS],
                "requirements": [f"{n}=={v}" for n, v in sorted(needed.items())], "image": IMAGE + IMAGE_DEPS,
                "pythons": pythons, "source_digest": digest, "bytes": size,
                "wheels": sorted(p.name for p in out.glob("*.whl"))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if size >= LIMIT_BYTES:
        raise SystemExit(f"wheelhouse: {size / 2**20:.1f} MiB is over the {LIMIT_BYTES / 2**20:.0f} MiB a device "
                         f"run carries")
    return manifest


def check(where: Path) -> dict:
    """The manifest of the wheelhouse at ``where``, after checking it was built from this source tree."""
    path = where / MANIFEST
    if not path.is_file():
        raise SystemExit(f"wheelhouse: no {path}: build it with `make wheelhouse` (or bench/wheelhouse.py build)")
    manifest = json.loads(path.read_text())
    if manifest["source_digest"] != source_digest():
        raise SystemExit(f"wheelhouse: {where} holds a Tessera wheel built from other sources than this tree: "
                         "run `make wheelhouse` again")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``build OUT`` or ``check DIR`` (prints what to install from it, one requirement per line)."""
    p = argparse.ArgumentParser(prog="bench/wheelhouse.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("build", "check"))
    p.add_argument("dir", type=Path)
    p.add_argument("--pythons", nargs="+", default=PYTHONS, help="CPython versions of the binary wheels")
    args = p.parse_args(argv)
    if args.command == "build":
        m = build(args.dir, args.pythons)
        print(f"wheelhouse: {len(m['wheels'])} wheels, {m['bytes'] / 2**20:.1f} MiB in {args.dir}")
    else:
        print("\n".join(check(args.dir)["install"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
