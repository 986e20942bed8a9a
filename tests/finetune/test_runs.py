"""Each method raises the held-out reward of a tiny base significantly (paired over 32 held-out prompt x seed
images, never trained on), with its invariants: KL 0 and importance ratio exactly 1 before the first update, the
DPO loss ln 2 at init. The run directory is a training run's, and ``tessera sample/export/eval`` and
``merge-lora`` work on it unchanged.

The full proof (n >= 64, controls with a constant reward, a negated reward, DPO win rate) is bench/preference.py.

Exact resume and rank agreement, on real processes: SIGKILL mid-run then resume gives the uninterrupted run's
per-update losses and adapters bit for bit (DDPO's per-prompt buffers and the RNG restored); 2 ranks over gloo end
with identical LoRA weights on both ranks, equal (up to float summation order) to one rank drawing the same global
batch, which only holds if every rank's gradients were all-reduced. (DDPO, DPO and DRaFT above run on 2 ranks.)

One file, so that one test worker trains the session's bases once.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune.conftest import ROOT, ft_cmd, ft_overrides, heldout, rows, run_ft, solo_env
from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(bases, run_id, base="flow", **kw):
    out = run_ft(ft_overrides(bases, run_id, base, **kw))
    H.check(out)
    return bases["tmp"] / "ftruns" / run_id


def _significant_gain(run_dir) -> dict:
    first, last = heldout(run_dir)[0], heldout(run_dir)[-1]
    assert first["step"] == 0 and first["heldout/kl"] == 0.0 and first["heldout/delta"] == 0.0  # adapters 0 = base
    assert last["heldout/delta"] > 0 and last["heldout/delta_t"] > 3, last  # paired, n = 32
    return last


GRPO = {"method.name": "grpo", "method.grpo.kl_beta": 0.04, "tracking.mode": "offline", "eval.every": 5}


@pytest.fixture(scope="module")
def grpo_run(bases):
    return _run(bases, "grpo", **GRPO)


def test_grpo_raises_the_heldout_reward_with_ratio_one_and_kl_zero_at_init(grpo_run):
    _significant_gain(grpo_run)
    train = [r for r in rows(grpo_run) if "ratio_dev_first" in r]
    assert len(train) == 20 and all(r["ratio_dev_first"] == 0.0 for r in train)  # before each update: exactly 1
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0  # KL to adapters-off: 0 until the first update
    assert all(0.0 <= r["zero_std_groups"] <= 1.0 and r["clipfrac"] >= 0 for r in train)


# DDPO, DPO and DRaFT train on 2 ranks, each drawing half of the 1-rank global batch: the gain is the method's, and
# both ranks must end with the same adapter (their gradients were all-reduced).
TWO_RANKS = {"rollout.batches_per_update": 1, "train.dump_rank_weights": "true"}


def _run2(bases, run_id, base="flow", **kw):
    out = run_ft(ft_overrides(bases, run_id, base, **TWO_RANKS, **kw), nproc=2)
    H.check(out)
    run = bases["tmp"] / "ftruns" / run_id
    r0, r1 = (load_file(run / "rank_weights" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    return run


def test_ddpo_on_a_ddpm_model_raises_the_heldout_reward(bases):
    run = _run2(bases, "ddpo", "ddpm", **{"method.name": "ddpo"})
    _significant_gain(run)
    assert all(r["ratio_dev_first"] == 0.0 for r in rows(run) if "ratio_dev_first" in r)


def test_dpo_on_policy_pairs_starts_at_ln2_and_wins_against_the_base(bases):
    run = _run2(bases, "dpo", **{"method.name": "dpo"})
    train = [r for r in rows(run) if "implicit_acc" in r]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6 and train[0]["inside_abs"] == 0.0
    assert train[0]["implicit_acc"] == 0.0 and max(r["implicit_acc"] for r in train) > 0.5
    last = _significant_gain(run)
    n = 32
    assert (last["heldout/win_rate"] - 0.5) / math.sqrt(0.25 / n) > 3  # against the base, same prompt and seed


def test_draft_reward_backprop_raises_the_heldout_reward(bases):
    run = _run2(bases, "draft", **{"method.name": "draft"})
    _significant_gain(run)
    assert all(r["grad_steps"] == 1 for r in rows(run) if "grad_steps" in r)  # DRaFT-1


def test_the_run_directory_is_a_training_runs_and_sample_export_eval_read_it(grpo_run, tmp_path, bases):
    for name in ("config.yaml", "metrics.jsonl", "model_config.yaml", "heldout/base.json",
                 "samples/step_000000000.png", "samples/step_000000020.png"):
        assert (grpo_run / name).exists(), name
    assert list((grpo_run / "wandb").glob("offline-run-*"))
    ckpt = H.ckpt_dir(grpo_run, 20)
    for name in ("model.safetensors", "index.json", "shards/rank00000.safetensors", "config.yaml",
                 "lora/adapter_model.safetensors", "lora/adapter_config.json", "COMPLETE"):
        assert (ckpt / name).exists(), name
    env = H.env()

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "tessera.cli", *args], env=env, capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]

    cli("sample", "--checkpoint", str(grpo_run), "--prompt", "a red dot", "--out", str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0
    cli("export", "--checkpoint", str(grpo_run), "--out", str(tmp_path / "export"))
    assert (tmp_path / "export" / "lora" / "adapter_model.safetensors").exists()
    cli("eval", "--config", str(ROOT / "configs" / "eval" / "quick.yaml"), "--checkpoint", str(grpo_run),
        "fid.enabled=false", "kid.enabled=false", "prompts.limit=2", "sampling.images_per_prompt=1",
        f"output={tmp_path / 'eval'}", "tracking.mode=offline", "rewards=[{name: colour_match}]", "report=false")
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "reward/colour_match" in json.dumps(got)
    # The merged model is the adapted policy: merging the exported adapter into the base on request gives it back.
    cli("merge-lora", "--base", str(bases["flow"]), "--adapter", str(ckpt / "lora"), "--out", str(tmp_path / "m"))
    merged, exported = load_file(tmp_path / "m" / "raw" / "model.safetensors"), \
        load_file(tmp_path / "export" / "raw" / "model.safetensors")
    assert merged.keys() == exported.keys()
    assert all(torch.allclose(merged[k], exported[k], atol=1e-6) for k in merged)
    base = H.ckpt_tensors(H.ckpt_dir(bases["flow"], 300), "ema")
    assert not torch.equal(base["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])


def test_dpo_on_a_pick_a_pic_parquet(bases, tmp_path):
    import io
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.finetune.shapes import draw

    def png(colour, shape, rnd):
        buf = io.BytesIO()
        draw(colour, shape, 16, rnd).save(buf, format="PNG")
        return buf.getvalue()

    rnd, rows_ = random.Random(0), {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(32):  # the red image is preferred, on either side
        shape, red_first = rnd.choice(["square", "circle"]), i % 2 == 0
        red, blue = png("red", shape, rnd), png("blue", shape, rnd)
        rows_["caption"].append(f"a red {shape}")
        rows_["jpg_0"].append(red if red_first else blue)
        rows_["jpg_1"].append(blue if red_first else red)
        rows_["label_0"].append(1.0 if red_first else 0.0)
    pq.write_table(pa.table(rows_), tmp_path / "pairs.parquet")
    run = _run(bases, "dpo-parquet", **{"method.name": "dpo", "method.dpo.pairs": "parquet",
                                        "method.dpo.parquet": str(tmp_path / "pairs.parquet"), "train.updates": 3,
                                        "eval.every": 0, "eval.seeds": 1})
    train = [r for r in rows(run) if "implicit_acc" in r]
    assert len(train) == 3 and abs(train[0]["loss"] - math.log(2)) < 1e-6 and train[-1]["loss"] < math.log(2)

RESUME = {"method.name": "ddpo", "train.updates": 8, "train.ckpt_every": 2, "eval.every": 0, "eval.seeds": 1}


def _losses(run_dir):
    return [(r["step"], r["loss"], r["reward_mean"]) for r in rows(run_dir) if "loss" in r]


def test_sigkill_then_resume_is_bitwise_exact(bases):
    root = bases["tmp"] / "ftruns"
    H.check(run_ft(ft_overrides(bases, "resume-ref", **RESUME)))
    proc = H.start(ft_cmd(ft_overrides(bases, "resume-kill", **RESUME)), **{k: v for k, v in solo_env().items()
                                                                          if k in ("RANK", "WORLD_SIZE", "MASTER_PORT")})
    kill_after = random.SystemRandom().randint(3, 6)  # metric lines: the update-0 held-out row, then updates
    H.wait_for(proc, lambda: H.metric_lines(root / "resume-kill") >= kill_after + 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not H.ckpt_dir(root / "resume-kill", 8).exists()
    H.check(run_ft(ft_overrides(bases, "resume-kill", **RESUME)))
    found = re.findall(r"resumed from \S+ at update (\d+)", (root / "resume-kill" / "logs" / "rank0.log").read_text())
    assert found and 2 <= int(found[-1]) < 8, "no resume logged"
    assert _losses(root / "resume-kill") == _losses(root / "resume-ref")
    ref, got = (H.ckpt_tensors(H.ckpt_dir(root / r, 8)) for r in ("resume-ref", "resume-kill"))  # the adapter
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _rank_weights(run_dir, rank):
    return load_file(run_dir / "rank_weights" / f"rank{rank}.safetensors")


def test_two_ranks_hold_identical_adapters_equal_to_one_rank(bases):
    root = bases["tmp"] / "ftruns"
    common = {"method.name": "grpo", "method.grpo.kl_beta": 0.04, "train.updates": 3, "eval.every": 0,
              "eval.seeds": 1, "train.dump_rank_weights": "true"}
    H.check(run_ft(ft_overrides(bases, "ranks2", **common, **{"rollout.batches_per_update": 1}), nproc=2))
    H.check(run_ft(ft_overrides(bases, "ranks1", **common, **{"rollout.batches_per_update": 2})))
    r0, r1, one = _rank_weights(root / "ranks2", 0), _rank_weights(root / "ranks2", 1), _rank_weights(root / "ranks1", 0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(k.endswith("lora_B.default.weight") and r0[k].abs().sum() > 0 for k in r0)  # it did train
    for k in r0:
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-6)
    two, solo = _losses(root / "ranks2"), _losses(root / "ranks1")
    assert [r[2] for r in two] == pytest.approx([r[2] for r in solo], abs=1e-6)  # the same samples, gathered


def _complete_steps(run_dir) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


def test_the_guard_stops_the_run_and_keeps_the_last_good_checkpoint(grpo_run, bases):
    # From the unbounded run: the first evaluation where the reward rose and the KL passed every earlier KL. A bound
    # between them must stop the same (deterministic) run right there.
    evals = [r for r in heldout(grpo_run) if r["step"] > 0]
    for i, r in enumerate(evals[1:], start=1):
        before = max(e["heldout/kl"] for e in evals[:i])
        if r["heldout/reward"] > r["heldout/base_reward"] and r["heldout/kl"] > before:
            trip, bound, last_good = r["step"], (before + r["heldout/kl"]) / 2, evals[i - 1]["step"]
            break
    else:
        pytest.fail(f"the GRPO run never raised its reward with a growing KL: {evals}")
    ovs = ft_overrides(bases, "grpo-guard", **GRPO, **{"eval.max_kl": bound, "train.ckpt_every": 100})
    H.check(run_ft(ovs))  # an early stop is a finished job: exit 0
    run = bases["tmp"] / "ftruns" / "grpo-guard"
    log = (run / "logs" / "rank0.log").read_text()
    assert f"early stop at update {trip}: held-out KL" in log and f"> eval.max_kl {bound}" in log
    stopped = json.loads((run / "early_stop.json").read_text())
    assert stopped["update"] == trip and stopped["last_good_checkpoint"].endswith(f"step_{last_good:09d}")
    # Every passing evaluation was checkpointed (a bound is set); the tripped state never was.
    assert _complete_steps(run) == list(range(5, trip, 5))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{last_good:09d}"
    assert max(r["step"] for r in rows(run)) == trip
    again = run_ft(ovs)  # a rerun (a requeue, a user) finds the run finished
    H.check(again)
    assert "stopped early by its held-out guard" in (run / "logs" / "rank0.log").read_text()
    assert _complete_steps(run)[-1] == last_good
    # Another run resumed from that checkpoint trips at the same update, before saving one of its own: its last
    # good state is the checkpoint it started from, not the base.
    good = run / "checkpoints" / f"step_{last_good:09d}"
    H.check(run_ft(ft_overrides(bases, "grpo-guard-from", **GRPO, **{"eval.max_kl": bound, "train.ckpt_every": 100,
                                                                     "train.resume": good})))
    stopped = json.loads((bases["tmp"] / "ftruns" / "grpo-guard-from" / "early_stop.json").read_text())
    assert stopped["update"] == trip and stopped["last_good_checkpoint"] == str(good)
