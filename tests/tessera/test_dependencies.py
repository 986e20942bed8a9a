"""pyproject.toml declares what the code imports, and the code imports what it declares.

Imports are read from the source (AST), per part: the installed packages (every folder pyproject maps under
``tessera``) against the core dependencies; ``bench/`` against core + ``bench``; ``tests/`` against core + ``dev``.
An import inside ``try: ... except ImportError`` is optional: it may come from any extra. Import names map to
distributions through ``importlib.metadata.packages_distributions()``.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCAL = {"tessera", "tests", "bench", *(p for p in PROJECT["tool"]["setuptools"]["package-dir"].values())}
# Import names of packages that are not installed on the test machine (CUDA-only), with their distribution.
NOT_INSTALLED = {"vllm": "vllm"}
# Declared without an import of their own, and why.
NEEDED_WITHOUT_IMPORT = {
    "torchvision": "open-clip-torch's image towers import it",
    "pytest-timeout": "a pytest plugin (--timeout)", "pytest-xdist": "a pytest plugin (make test -n 2)",
    "import-linter": "the lint-imports command (tests/tessera/test_architecture.py)",
}


def norm(name: str) -> str:
    """A distribution name in PEP 503 form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extra: str | None) -> set[str]:
    """Distribution names of the core dependencies or of one extra."""
    reqs = PROJECT["project"]["dependencies"] if extra is None else PROJECT["project"]["optional-dependencies"][extra]
    return {norm(Requirement(r).name) for r in reqs}


def _guarded(tree: ast.AST) -> set[int]:
    """ids of Import nodes inside a ``try`` that handles ImportError (an optional import)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                           for n in ast.walk(h.type)) for h in node.handlers):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def imports(folders: list[str]) -> dict[str, tuple[bool, str]]:
    """Top-level third-party import name -> (always imported somewhere, one file that imports it)."""
    found: dict[str, tuple[bool, str]] = {}
    # Modules of these folders and bench/'s scripts (tests import some of them with bench/ on sys.path).
    local_files = {p.stem for f in [*folders, "bench"] for p in (ROOT / f).rglob("*.py")}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            optional = _guarded(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in LOCAL or top in local_files or top == "__future__":
                        continue
                    always = found.get(top, (False, ""))[0] or id(node) not in optional
                    found[top] = (always, found.get(top, (False, str(path.relative_to(ROOT))))[1])
    return found


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def distributions(import_name: str) -> set[str]:
    """The distributions that provide an import name."""
    if import_name in NOT_INSTALLED:
        return {NOT_INSTALLED[import_name]}
    dists = _packages_distributions().get(import_name)
    assert dists, f"{import_name} is imported but provided by no installed distribution"
    return {norm(d) for d in dists}


def _check(folders: list[str], allowed: set[str], optional_allowed: set[str]) -> set[str]:
    """Assert every import of ``folders`` is declared; returns the distributions used."""
    used, missing = set(), []
    for name, (always, where) in sorted(imports(folders).items()):
        dists = distributions(name)
        ok = allowed if always else allowed | optional_allowed
        if not dists & ok:
            missing.append(f"{name} ({where}) from {sorted(dists)}")
        used |= dists
    assert not missing, "imported but not declared: " + "; ".join(missing)
    return used


def _all_extras() -> set[str]:
    return set().union(*(declared(e) for e in PROJECT["project"]["optional-dependencies"]))


def test_the_installed_packages_import_only_core_dependencies_and_optional_ones_from_extras():
    folders = [f for f in PROJECT["tool"]["setuptools"]["package-dir"].values() if f != "configs"]
    used = _check(folders, declared(None), _all_extras())
    unused = declared(None) - used - set(NEEDED_WITHOUT_IMPORT)
    assert not unused, f"declared in dependencies but never imported: {sorted(unused)}"


def test_bench_and_tests_import_what_their_extras_declare():
    bench = _check(["bench"], declared(None) | declared("bench"), set())
    assert not declared("bench") - bench, f"bench extra declares unused {sorted(declared('bench') - bench)}"
    tests = _check(["tests"], declared(None) | declared("dev"), set())
    unused = declared("dev") - tests - set(NEEDED_WITHOUT_IMPORT)
    assert not unused, f"dev extra declares unused {sorted(unused)}"


def test_the_vllm_extra_is_what_the_vllm_captioner_imports():
    assert declared("vllm") == {"vllm"} and "vllm" in imports(["recaption"])


def test_one_opencv_wheel_nothing_declared_pulls_opencv_python():
    """The headless wheel only: no declared distribution (or what it requires, as installed here) needs the GUI
    ``opencv-python``, which ships the same ``cv2`` and overwrites it."""
    seen, todo = set(), [d for d in declared(None) | _all_extras()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (vllm): nothing to follow
        todo += [norm(Requirement(r).name) for r in reqs if "extra ==" not in r]
    assert "opencv-python-headless" in seen and "opencv-python" not in seen
