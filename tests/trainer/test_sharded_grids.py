"""Sample grids and in-training evaluation are sharded over the ranks: every rank gets the whole weights, samples
its dealt share (item i on rank i % world, with a one-rank run's seed for item i), and rank 0 gets the images
(and the FID features) as tensors. Measured from outside the code under test by a sitecustomize probe
(tests/trainer/sharding_probe) that records, per process, the seeds each sampler call drew and the images each
FID Inception forward saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer import helpers as H

PROBE = Path(__file__).parent / "sharding_probe"
QUICK = H.ROOT / "configs" / "eval" / "quick.yaml"
GRID_PROMPTS = ["red", "blue", "green"]  # 3 over 2 ranks: rank 0 samples prompts 0 and 2, rank 1 prompt 1


def _collectives_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from tessera.trainer.distributed import all_gather_dealt_json, dealt, gather_dealt
    from tessera.trainer.zero_state import Fragment, gather_to_all, gather_to_rank0

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    res = {}
    for total in (5, 1):  # uneven, and one where rank 1 holds no row
        local = torch.tensor([[i, 10 * i] for i in dealt(total)], dtype=torch.int64).reshape(-1, 2)
        got = gather_dealt(local, total)
        res[f"dealt{total}"] = None if got is None else got.tolist()
    w, b = torch.arange(12.0).view(3, 4), torch.tensor([7.0, 8.0])
    # ZeRO-style slices: rank 0 owns w[0:5] and none of b, rank 1 owns w[5:12] and all of b.
    span = {"w": (0, 5) if rank == 0 else (5, 7), "b": (0, 0) if rank == 0 else (0, 2)}
    frags = [Fragment(n, t.shape, span[n][0], span[n][1], lambda key, t=t, s=span[n][0]: t.flatten()[s:])
             for n, t in (("w", w), ("b", b))]
    res["all"] = {k: v.tolist() for k, v in gather_to_all(frags, lambda f: f.view()).items()}
    res["rank0"] = {k: v.tolist() for k, v in gather_to_rank0(frags, lambda f: f.view()).items()}
    for n in (5, 1):  # every rank gets every item; each item read by one rank (rank 1 reads none of 1)
        reads = []
        res[f"json{n}"] = all_gather_dealt_json(n, lambda i: reads.append(i) or {"i": i, "s": "a\nb" * i})
        res[f"reads{n}"] = reads
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_dealt_and_gather_to_all_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["dealt5"] == [[i, 10 * i] for i in range(5)] and r1["dealt5"] is None  # item order on rank 0 only
    assert r0["dealt1"] == [[0, 0]] and r1["dealt1"] is None
    full = {"w": torch.arange(12.0).view(3, 4).tolist(), "b": [7.0, 8.0]}
    assert r0["all"] == full and r1["all"] == full  # every rank: the whole tensors
    assert r0["rank0"] == full and r1["rank0"] == {}
    for n in (5, 1):
        assert r0[f"json{n}"] == r1[f"json{n}"] == [{"i": i, "s": "a\nb" * i} for i in range(n)]
    assert (r0["reads5"], r1["reads5"], r0["reads1"], r1["reads1"]) == ([0, 2, 4], [1, 3], [0], [])


def _reference_folder(root: Path) -> Path:
    """Six smooth colour images: the FID reference (a few, so its Inception pass is quick)."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(6):
        base = g.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(base).resize((32, 32), Image.BILINEAR).save(root / f"{i}.png")
    return root


def _probe_records(probe_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(probe_dir.glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_grid_and_eval_are_sharded_and_equal_one_rank(tmp_path):
    """A 2-rank run samples its final grid and an in-training eval (FID, KID, a reward): each rank draws exactly
    its dealt items' seeds and runs the FID network and the reward on its own images only; the grid PNG and the metrics are
    bitwise those of an unsharded one-rank grid and suite on the same (checkpointed) EMA weights."""
    from tessera.evaluation.config import load_suite
    from tessera.evaluation.generate import image_seed, work_items
    from tessera.trainer.inference import grid_seed

    enc = H.tiny_text_encoder(tmp_path / "enc")
    ds = tmp_path / "ds"
    H.tiny_dataset(ds, shards=2, per_shard=8, buckets={"16x16": 1.0})  # one bucket: every reader fills batches
    suite_ov = ["prompts.limit=2", "sampling.images_per_prompt=2", "sampling.steps=2", "kid.subsets=5",
                f"fid.reference={_reference_folder(tmp_path / 'ref')}", f"fid.stats_cache={tmp_path / 'fidcache'}",
                "rewards=[{name: colorfulness}]"]
    suite = load_suite(QUICK, suite_ov)
    probe = tmp_path / "probe"
    probe.mkdir()
    ovs = H.overrides(tmp_path, "sharded", str(ds), enc, **{
        "train.total_samples": 16, "samples.enabled": "true", "samples.prompts": json.dumps(GRID_PROMPTS),
        "eval.every_samples": 16, "eval.suite": str(QUICK), "eval.overrides": json.dumps(suite_ov)})
    H.check(H.run_train(ovs, nproc=2, TESSERA_SAMPLE_PROBE=str(probe),
                        PYTHONPATH=os.pathsep.join([str(PROBE), str(H.ROOT)])))
    run = tmp_path / "runs" / "sharded"
    (row,) = [r for r in H.metrics(run) if "eval/quick/fid" in r]
    assert row["step"] == 2  # 16 samples at 2 x 4 per step: the last step, whose EMA the last checkpoint holds

    # Who sampled what: per rank, exactly the dealt items' seeds (grid: grid_seed; eval: image_seed).
    recs = _probe_records(probe)
    grid_of = {r: {grid_seed(0, i) for i in range(r, len(GRID_PROMPTS), 2)} for r in (0, 1)}  # samples.seed 0
    items = work_items(2, 2)
    eval_of = {r: {image_seed(suite.sampling.seed, p, k) for p, k in items[r::2]} for r in (0, 1)}
    for r in (0, 1):
        drawn = [s for x in recs if x["kind"] == "sample" and x["rank"] == r for s in x["seeds"]]
        assert sorted(drawn) == sorted(grid_of[r] | eval_of[r]), f"rank {r} sampled other items than its share"
        # Each rank's FID forwards: its own 2 images; rank 0 also the 6 reference images (then cached on disk).
        seen = sorted(x["n"] for x in recs if x["kind"] == "inception" and x["rank"] == r)
        assert seen == ([2, 6] if r == 0 else [2]), f"rank {r}'s FID network saw batches of {seen}"
        # ... and scores its own 2 images' reward (rank 0 does not score the gathered 4).
        scored = [x["n"] for x in recs if x["kind"] == "reward" and x["rank"] == r]
        assert scored == [2], f"rank {r}'s reward scored batches of {scored}"

    # The one-rank reference, unsharded, in a process with the ranks' environment (one thread: the FID's
    # eigensolver rounds differently with two BLAS threads, by ~1e-8 relative).
    ref = tmp_path / "ref_out"
    ref.mkdir()
    cmd = [sys.executable, "-m", "tests.trainer.one_rank_reference", str(run), str(ref), json.dumps(GRID_PROMPTS),
           json.dumps(suite_ov)]
    H.check(subprocess.run(cmd, env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=300))
    got = np.asarray(Image.open(run / "samples" / "step_000000002.png").convert("RGB"))
    want = np.asarray(Image.open(ref / "grid.png").convert("RGB"))
    assert got.shape == want.shape and np.array_equal(got, want)
    want_m = json.loads((ref / "metrics.json").read_text())
    for k in ("n_images", "fid", "kid", "kid_std", "kid_subset_size", "reward/colorfulness"):
        assert row[f"eval/quick/{k}"] == want_m[k], k
