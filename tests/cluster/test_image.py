"""The Dockerfile that ``cluster.k8s.image`` documents, read as text (no Docker daemon here: the image is not built
in the tests): a CUDA runtime base, DeepSpeed's CUDA ops compiled in a devel stage (a runtime image has no nvcc to
JIT-build them), the project and the shipped configs' weights installed as ``tessera.assets`` says."""

from __future__ import annotations

import re

from packaging.requirements import Requirement

from tessera.assets import PACKAGES
from tessera.config import read_yaml
from tests.cluster.conftest import ROOT


def _lines(text: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def test_the_dockerfile_builds_a_cuda_runtime_image_of_the_project():
    text = (ROOT / "Dockerfile").read_text()
    lines = _lines(text)
    args = dict(m.groups() for m in (re.match(r"ARG (\w+)=(\S+)", ln) for ln in lines) if m)
    stages = [ln for ln in lines if ln.startswith("FROM ")]
    assert re.fullmatch(r"FROM nvidia/cuda:\$\{CUDA\}-cudnn-devel-ubuntu\$\{UBUNTU\} AS build", stages[0])
    assert re.fullmatch(r"FROM nvidia/cuda:\$\{CUDA\}-cudnn-runtime-ubuntu\$\{UBUNTU\}", stages[-1])
    build = next(ln for ln in lines if "pip wheel" in ln and "deepspeed" in ln)
    for flag in ("DS_ACCELERATOR=cuda", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert flag in build
    deepspeed = next(Requirement(d) for d in _dependencies() if d.startswith("deepspeed"))
    assert deepspeed.specifier.contains(args["DEEPSPEED"]), (args["DEEPSPEED"], deepspeed)
    runtime = lines[lines.index(stages[-1]):]
    assert any("pip install --no-cache-dir /src" in ln for ln in runtime)
    assets = next(ln for ln in runtime if "--no-deps" in ln).split("--no-deps", 1)[1].split("&&")[0].split()
    assert set(assets) == {req for _, req, _ in PACKAGES.values()}  # what tessera.assets tells users to install
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "build", "tests"} <= set(ignored)


def _dependencies() -> list[str]:
    """``[project] dependencies`` of pyproject.toml."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_the_k8s_config_documents_the_image_it_needs():
    k8s = read_yaml(ROOT / "configs" / "cluster" / "k8s.yaml")
    text = (ROOT / "configs" / "cluster" / "k8s.yaml").read_text()
    assert k8s["k8s"]["image"] is None and "docker build -t <registry>/tessera" in text and "Dockerfile" in text
