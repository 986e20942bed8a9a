"""``make wheelhouse`` and the offline path of ``bench/gpu_check.sh`` on this CPU machine, up to where a GPU is needed.

A stand-in for the GPU machine's image: a fresh interpreter that sees only torch, transformers, peft, safetensors,
pyarrow, numpy, pillow (and what those need) and pip, taken from this venv. ``gpu_check.sh --cpu-dry-run`` installs
Tessera, DeepSpeed and diffusers into it from the wheelhouse alone (no index) and runs every step of the check with
a tiny DiT on the CPU: dataset, memory estimate, SDPA probe, training with a checkpoint half-way, a resume from it.

It runs from a copy of the working tree, as the device tool sends one (and so that edits made meanwhile cannot make
the wheelhouse stale under it). The image and the check's work directory live under build/gpu-check-dry-run at a
fixed path: the DeepSpeed CPU op the first run compiles (minutes on 2 busy cores) is keyed by the include paths,
and later runs reuse it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "build" / "wheelhouse"
WORK = ROOT / "build" / "gpu-check-dry-run"
ABSENT = ("ray", "wandb", "deepspeed", "diffusers", "webdataset", "open_clip", "scipy")


def make_image(root: Path) -> Path:
    """An interpreter whose packages are the GPU image's (symlinked from this venv); returns its python."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from wheelhouse import IMAGE, closure
    finally:
        sys.path.pop(0)
    site, pkgs = Path(sysconfig.get_paths()["purelib"]), root / "image-packages"
    pkgs.mkdir(parents=True, exist_ok=True)
    for name in closure([*IMAGE, "pip"]):
        for f in md.distribution(name).files or []:
            top = f.parts[0]
            if not top.startswith("..") and top != "__pycache__" and (site / top).exists() \
                    and not (pkgs / top).is_symlink():
                (pkgs / top).symlink_to(site / top)
    venv = root / "python"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (next(venv.glob("lib/python*/site-packages")) / "image.pth").write_text(f"{pkgs}\n")
    return venv / "bin" / "python"


def snapshot(dest: Path) -> Path:
    """The working tree's files (tracked, and untracked but not ignored) copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.mark.long
@pytest.mark.slow
def test_make_wheelhouse_then_the_gpu_check_runs_offline_from_it_up_to_the_gpu(tmp_path):
    tree = snapshot(tmp_path / "tree")
    out = subprocess.run(["make", "-s", "wheelhouse", f"VENV={Path(sys.prefix)}", f"WHEELHOUSE={WHEELHOUSE}"],
                         cwd=tree, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((WHEELHOUSE / "wheelhouse.json").read_text())
    size = sum(p.stat().st_size for p in WHEELHOUSE.iterdir())  # what the device tool carries
    assert size == manifest["bytes"] + (WHEELHOUSE / "wheelhouse.json").stat().st_size and size < 64 * 2**20
    names = {w.split("-")[0].lower() for w in manifest["wheels"]}
    assert {"tessera", "deepspeed", "diffusers"} <= names and not names & {"ray", "wandb", "torch", "scipy"}

    python = make_image(WORK / "image")
    probe = "import importlib.util as u, json, sys; print(json.dumps([m for m in sys.argv[1:] if u.find_spec(m)]))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR", "VIRTUAL_ENV")}
    seen = subprocess.run([str(python), "-c", probe, "torch", "transformers", "peft", *ABSENT], env=env,
                          cwd=WORK, capture_output=True, text=True, timeout=120)
    assert json.loads(seen.stdout) == ["torch", "transformers", "peft"], seen.stderr  # the image, nothing more

    run = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--work", str(WORK / "run"),
                          "--wheelhouse", str(WHEELHOUSE)], env=dict(env, PY=str(python)), capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    result = json.loads(run.stdout)  # stdout is the one JSON
    site = result["install"]["site"]
    assert result["install"]["wheelhouse"] == str(WHEELHOUSE) and site.startswith(str(WORK / "run" / "prefix"))
    assert result["environment"]["deepspeed"] == next(r.split("==")[1] for r in manifest["requirements"]
                                                      if r.startswith("deepspeed=="))
    assert result["mode"] == "cpu-dry-run" and result["ok"] is True
    train = result["train"]
    assert train["img_per_s"] > 0 and train["peak_memory_gib"] > 0 and result["memory_estimate_gib"] > 0
    assert train["checkpoint"]["stall_s"] > 0 and train["checkpoint"]["shard_bytes"] > 0
    assert train["resume"] == {"from_step": 4, "steps_compared": 4, "max_rel_loss_diff": 0.0, "ok": True}
    assert result["sdpa"]["ops"] and result["nccl"]["ran"] is False and result["zero3"]["ran"] is False
    # What the check ran with: the image and the wheelhouse's packages, still without Ray, W&B or scipy.
    after = subprocess.run([str(python), "-c", probe, "tessera", "deepspeed", "diffusers", *ABSENT[:2], "scipy"],
                           env=dict(env, PYTHONPATH=site), cwd=WORK, capture_output=True, text=True, timeout=120)
    assert json.loads(after.stdout) == ["tessera", "deepspeed", "diffusers"], after.stderr


def test_the_check_refuses_a_wheelhouse_of_other_sources(tmp_path):
    (tmp_path / "wheelhouse.json").write_text(json.dumps({"source_digest": "0" * 64, "install": ["deepspeed"]}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "wheelhouse.py"), "check", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "built from other sources than this tree: run `make wheelhouse`" in out.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "wheelhouse.py"), "check", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "build it with `make wheelhouse`" in missing.stderr
