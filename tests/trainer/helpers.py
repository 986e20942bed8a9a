"""Tiny training runs for the trainer's tests (and the evaluation suite's end-to-end test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "tests" / "trainer" / "tiny_train.yaml"


def tiny_text_encoder(directory: Path) -> str:
    """A 1-layer, 32-wide T5 encoder + byte tokenizer saved to ``directory`` (loaded back via from_pretrained)."""
    import torch
    import transformers

    directory = Path(directory)
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.T5Config(vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                    decoder_start_token_id=0)
        transformers.T5EncoderModel(cfg).save_pretrained(directory)
        transformers.ByT5Tokenizer().save_pretrained(directory)
    return str(directory)


def tiny_dataset(root: Path, shards: int = 4, per_shard: int = 24, **kw):
    """A dataset in the ingest format with 16x16 / 16x32 / 32x16 buckets (see data/dataset_factory.py)."""
    from tests.trainer.data.dataset_factory import write_dataset

    return write_dataset(str(root), shards=shards, per_shard=per_shard, smooth=True, variants={"alt": 1.0}, **kw)


def overrides(tmp: Path, run_id: str, data: str, encoder: str, **extra) -> list[str]:
    """Dotted overrides for tests/trainer/tiny_train.yaml pointing at ``tmp``."""
    ov = {"run.root": str(tmp / "runs"), "run.id": run_id, "data.path": data,
          "text_encoder.t5.path": encoder}
    ov.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in ov.items()]


def env(**extra) -> dict:
    """Environment of a training subprocess: offline, quiet, the venv's prebuilt DeepSpeed ops."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
             TESSERA_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    e.update(extra)
    return e


def train_cmd(ovs: list[str], nproc: int = 1) -> list[str]:
    """The command line of a tiny training run."""
    return [sys.executable, "-m", "tessera.cli", "train", "--config", str(TINY_CONFIG), "--nproc", str(nproc), *ovs]


def run_train(ovs: list[str], nproc: int = 1, timeout: float = 600, **env_extra) -> subprocess.CompletedProcess:
    """Run a tiny training to completion; returns the completed process (check ``returncode``)."""
    return subprocess.run(train_cmd(ovs, nproc), env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows; for a step logged twice (a resumed run), the last row wins, in step order."""
    rows: dict[int, dict] = {}
    p = Path(run_dir) / "metrics.jsonl"
    for line in p.read_text().splitlines() if p.exists() else []:
        r = json.loads(line)
        rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


def make_tiny_checkpoint(tmp_path: Path, steps: int = 4) -> Path:
    """Train a tiny DiT for a few steps in one process; returns the run directory (with checkpoints/)."""
    enc = tiny_text_encoder(tmp_path / "enc")
    ds = tmp_path / "ds"
    if not (ds / "manifest.json").exists():
        tiny_dataset(ds)
    ovs = overrides(tmp_path, "tiny", str(ds), enc, **{"train.total_samples": steps * 4, "samples.enabled": "true"})
    out = run_train(ovs)
    if out.returncode != 0:
        raise RuntimeError(f"tiny training failed:\n{out.stderr[-4000:]}")
    return tmp_path / "runs" / "tiny"


def check(out: subprocess.CompletedProcess) -> None:
    """Assert a run succeeded, showing both ends of stderr (the first failing rank logs the cause first)."""
    assert out.returncode == 0, out.stderr[:6000] + "\n...\n" + out.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    """The logged loss of every step (a replayed step's last record wins)."""
    return [m["loss"] for m in metrics(run_dir)]


def ckpt_dir(run_dir: Path, step: int) -> Path:
    """The checkpoint directory of ``step`` in a run."""
    return Path(run_dir) / "checkpoints" / f"step_{step:09d}"


def ckpt_tensors(ckpt: Path, kind: str = "weight") -> dict:
    """Full tensors of one kind (weight, exp_avg, exp_avg_sq, ema) of a sharded checkpoint, consolidated offline."""
    from tessera.trainer import checkpoint as C
    from tessera.trainer.shards import ShardIndex

    return ShardIndex(str(ckpt), C.read_json(f"{ckpt}/index.json")).full(kind)


def same_files(a: Path, b: Path, kinds=("weight", "ema", "exp_avg", "exp_avg_sq")) -> None:
    """Assert two checkpoints hold equal tensors (torch.equal) of each kind, whatever world size wrote them."""
    import torch

    for kind in kinds:
        x, y = ckpt_tensors(a, kind), ckpt_tensors(b, kind)
        assert x.keys() == y.keys(), kind
        bad = [k for k in x if not torch.equal(x[k], y[k])]
        assert not bad, f"{kind} differs in {bad[:5]}"


def start(cmd: list[str], **env_extra) -> subprocess.Popen:
    """Start a run in its own process group (so a kill reaches every rank)."""
    return subprocess.Popen(cmd, env=env(**env_extra), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 600, poll: float = 0.05) -> None:
    """Poll ``ready()`` until true; fail if the run ends first or the timeout passes."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(poll)
    raise AssertionError("timed out")


def resumed_step(run_dir: Path) -> int | None:
    """The step of the last 'resumed from ... at step N' line in rank 0's log."""
    import re

    found = re.findall(r"resumed from \S+ at step (\d+)", (Path(run_dir) / "logs" / "rank0.log").read_text())
    return int(found[-1]) if found else None


def metric_lines(run_dir: Path) -> int:
    """Lines in metrics.jsonl (every run of the id appends)."""
    p = Path(run_dir) / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0
