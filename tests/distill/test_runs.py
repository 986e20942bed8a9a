"""`tessera distill` end to end, on real processes and the trainer's machinery: an lcm run stopped by its time budget
and resumed gives the uninterrupted run's losses and weights bit for bit; the student's checkpoint samples with its
own sampler through `tessera sample` and exports (a DDPM lcm student with a diffusers LCMScheduler folder); LCM-LoRA
writes the merged model and PEFT's adapter; progressive rounds halve the steps of an eps teacher's v student;
reflow's teacher pairs are reused by a rerun and rebuilt, never mixed, when the teacher changes; reflow on an eps
teacher is refused naming the methods that fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.distill import helpers as D
from tests.trainer import helpers as H

ROOT = Path(__file__).resolve().parents[2]


def _ovs(teachers: dict, run_id: str, teacher: str = "flow", **extra) -> list[str]:
    ov = {"checkpoint": str(teachers[teacher]), "run.root": str(teachers["tmp"] / "druns"), "run.id": run_id, **extra}
    return [f"{k}={v}" for k, v in ov.items()]


def _run(teachers, run_id, teacher="flow", **extra) -> Path:
    H.check(D.run_distill(_ovs(teachers, run_id, teacher, **extra)))
    return teachers["tmp"] / "druns" / run_id


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], env=H.env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_lcm_stopped_and_resumed_is_bitwise_exact_and_samples_with_its_own_sampler(teachers, tmp_path):
    ref = _run(teachers, "lcm-ref")
    # max_minutes=0: the budget is spent after the first step, so the run checkpoints at step 2 and stops
    cut = _run(teachers, "lcm-cut", **{"train.max_minutes": 0})
    assert [r["step"] for r in H.metrics(cut)][-1] == 2 and (H.ckpt_dir(cut, 2) / "COMPLETE").exists()
    _run(teachers, "lcm-cut")  # resume=auto
    assert "resumed from" in (cut / "logs" / "rank0.log").read_text()
    assert H.losses(cut) == H.losses(ref) and len(H.losses(ref)) == 8
    H.same_files(H.ckpt_dir(cut, 8), H.ckpt_dir(ref, 8))  # weights, Adam moments and the EMA (the lcm target)
    cfg = (H.ckpt_dir(ref, 8) / "config.yaml").read_text()
    assert "name: lcm" in cfg and "lcm_origin_steps: 16" in cfg  # the student's sampler rides in its checkpoint
    out = tmp_path / "grid.png"
    H.check(_cli("sample", "--checkpoint", str(ref), "--prompt", "a red square", "--out", str(out)))
    assert out.stat().st_size > 0
    H.check(_cli("export", "--checkpoint", str(ref), "--out", str(tmp_path / "exp")))
    meta = json.loads((tmp_path / "exp" / "tessera.json").read_text())
    assert meta["sampler"]["name"] == "lcm" and meta["sampler"]["steps"] == 2 and meta["sampler"]["cfg_scale"] == 1.0


def test_an_lcm_student_of_a_ddpm_teacher_exports_a_diffusers_lcm_scheduler(teachers, tmp_path):
    from diffusers import LCMScheduler

    from tessera.trainer.diffusion.samplers.lcm import LCMSampler
    from tessera.trainer.inference import load_for_sampling

    run = _run(teachers, "lcm-eps", "eps", **{"train.total_samples": 16})
    H.check(_cli("distill-export", "--checkpoint", str(run), "--out", str(tmp_path / "dx")))
    sched = LCMScheduler.from_pretrained(tmp_path / "dx", subfolder="scheduler")
    assert sched.config.original_inference_steps == 16 and sched.config.prediction_type == "epsilon"
    _, _, _, objective, sampler, _ = load_for_sampling(str(tmp_path / "dx"))
    ours = LCMSampler(objective.ddpm, origin_steps=sampler.lcm_origin_steps)
    for k in (1, 2, 4):
        ours.set_timesteps(k)
        sched.set_timesteps(k)
        assert [int(t) for t in ours.timesteps] == sched.timesteps.tolist()
    assert (tmp_path / "dx" / "transformer" / "config.json").exists()


@pytest.mark.long
def test_lcm_lora_writes_the_merged_student_and_the_adapter(teachers, tmp_path):
    run = _run(teachers, "lcm-lora", **{"lora.enabled": "true", "lora.rank": 4, "train.total_samples": 16})
    ck = H.ckpt_dir(run, 2)
    assert (ck / "lora" / "adapter_config.json").exists() and (ck / "model.safetensors").exists()
    base = H.ckpt_tensors(H.ckpt_dir(teachers["flow"], 50), "ema")
    with safe_open(str(ck / "model.safetensors"), "pt") as merged:
        assert sorted(merged.keys()) == sorted(base)  # the adapters merged into the teacher's weights
        changed = [k for k in base if not torch.equal(merged.get_tensor(k), base[k])]
    assert changed
    H.check(_cli("sample", "--checkpoint", str(run), "--prompt", "a red square", "--out", str(tmp_path / "g.png")))


def test_progressive_halves_the_steps_of_an_eps_teachers_v_student(teachers):
    run = _run(teachers, "prog", "eps", **{"method.name": "progressive", "train.total_samples": 48})
    rows = H.metrics(run)
    assert [r["progressive/teacher_steps"] for r in rows if "progressive/teacher_steps" in r][-1] == 4
    cfg = (H.ckpt_dir(run, 6) / "config.yaml").read_text()
    assert "prediction: v" in cfg and "name: ddim" in cfg and "steps: 2\n" in cfg
    assert (H.ckpt_dir(run, 6) / "distill_teacher.safetensors").exists()


def _pairs(cache: Path) -> dict:
    return json.loads((cache / "pairs.json").read_text())


def test_reflow_pairs_are_reused_and_rebuilt_never_mixed_when_the_teacher_changes(teachers):
    from tessera.distill.pairs import chunk_fingerprint

    cache = teachers["tmp"] / "pair-cache"
    common = {"method.name": "reflow", "method.reflow.cache_dir": str(cache), "train.total_samples": 16}
    _run(teachers, "reflow-1", **common)
    fp, chunks = _pairs(cache)["fingerprint"], sorted(cache.glob("chunk_*.safetensors"))
    stamps = {p.name: p.stat().st_mtime_ns for p in chunks}
    assert len(chunks) == 2 and all(chunk_fingerprint(str(p)) == fp for p in chunks)
    run2 = _run(teachers, "reflow-2", **common)
    assert "reusing" in (run2 / "logs" / "rank0.log").read_text()
    assert {p.name: p.stat().st_mtime_ns for p in sorted(cache.glob("chunk_*.safetensors"))} == stamps
    # another teacher (its raw weights): the cache is rebuilt, and a stray chunk of the old recipe goes too
    (cache / "chunk_000007.safetensors").write_bytes(chunks[0].read_bytes())
    run3 = _run(teachers, "reflow-3", teacher_weights="raw", **common)
    assert "rebuilding" in (run3 / "logs" / "rank0.log").read_text()
    new = _pairs(cache)["fingerprint"]
    assert new != fp and sorted(p.name for p in cache.glob("chunk_*")) == [p.name for p in chunks]
    assert all(chunk_fingerprint(str(p)) == new for p in cache.glob("chunk_*"))
    # trajectory targets: another recipe (rebuilt), and each pair also holds the teacher's state at the student's
    # interior level (sample_steps 2: noise level 0.5), strictly between its noise and its image
    run4 = _run(teachers, "reflow-4", teacher_weights="raw", **common, **{"method.reflow.targets": "trajectory"})
    assert "rebuilding" in (run4 / "logs" / "rank0.log").read_text() and _pairs(cache)["fingerprint"] != new
    with safe_open(str(cache / "chunk_000000.safetensors"), "pt") as f:
        z, x1, states = f.get_tensor("noise"), f.get_tensor("latent"), f.get_tensor("states")
    assert states.shape == (z.shape[0], 1, *z.shape[1:]) and torch.isfinite(states).all()
    assert (states[:, 0] - z).abs().mean() > 0.1 and (states[:, 0] - x1).abs().mean() > 0.1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in H.metrics(run4))


def test_reflow_on_an_eps_teacher_is_refused_naming_the_alternatives(teachers):
    out = _cli("distill", "--config", str(D.CONFIG), "--checkpoint", str(teachers["eps"]), "method.name=reflow",
               "--dry-run")
    assert out.returncode != 0
    assert "reflow" in out.stderr and "'ddpm'" in out.stderr and "progressive, lcm" in out.stderr
    assert str(teachers["eps"]) in out.stderr


@pytest.mark.long
def test_lcm_on_two_ranks_trains_like_one_rank_with_the_same_readers(teachers):
    """The distillation loop is the trainer's: 2 ranks x batch 4 (one loader reader each) take the steps of 1 rank x
    batch 4 x 2 accumulated micro-batches with 2 readers (a worker yields whole batches: the same samples per step,
    the same per-sample draws), so losses and the student's weights, Adam moments and EMA target agree to float
    tolerance (the gradient all-reduce sums in another order)."""
    common = {"train.total_samples": 32, "train.deterministic": "true", "data.shuffle_buffer": 0}
    one = _run(teachers, "lcm-1x4x2", **common, **{"data.batch_size": 4, "optim.grad_accum": 2, "data.num_workers": 2})
    H.check(D.run_distill(_ovs(teachers, "lcm-2x4", **common, **{"data.batch_size": 4, "data.num_workers": 1}),
                          nproc=2))
    two = teachers["tmp"] / "druns" / "lcm-2x4"
    assert {p.name for p in (two / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    rows1, rows2 = H.metrics(one), H.metrics(two)
    assert [r["samples"] for r in rows2] == [r["samples"] for r in rows1] == [8, 16, 24, 32]
    assert [r["loss"] for r in rows2] == pytest.approx([r["loss"] for r in rows1], rel=1e-4)
    for kind in ("weight", "ema", "exp_avg"):
        a, b = H.ckpt_tensors(H.ckpt_dir(one, 4), kind), H.ckpt_tensors(H.ckpt_dir(two, 4), kind)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), kind
