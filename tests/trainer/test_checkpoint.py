"""Checkpoint files and directories: the shard format (plain safetensors, any element range read back, on S3 only
the bytes asked for); only ``COMPLETE`` makes a directory count, for every reader, locally and on S3; offline
consolidation; a write failure on one of 4 real ranks fails all of them and commits nothing; real ranks SIGKILLed
while saving leave the previous checkpoint the newest (10 of 10 times at random points, locally and on S3, where
``COMPLETE`` is seen published last); the background writer's states; the loop's collective device and run id."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import random
import signal
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tessera import storage
from tessera.trainer import checkpoint as C
from tessera.trainer import consolidate as K
from tessera.trainer import shards as S
from tessera.trainer import train_state as TS
from tessera.trainer import zero_state as Z
from tessera.trainer.distributed import collective_device, shared_run_id
from tests.fixtures.s3_recorder import recorded_bucket, s3_recorder  # noqa: F401 (fixtures)

SHAPES = {"a.weight": (7, 5), "a.bias": (5,), "b.weight": (13, 5), "b.bias": (13,)}  # odd sizes: ragged slices


def _full(step: int, kind: str, name: str) -> torch.Tensor:
    """The synthetic state of checkpoint ``step``: every tensor a function of (step, kind, name)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{step}:{kind}:{name}".encode()))  # the same in every process
    return torch.randn(SHAPES[name], generator=g)


def _frags(rank: int, world: int, step: int) -> list[Z.Fragment]:
    """ZeRO-3's layout: rank r owns elements [r * n, (r + 1) * n) of each flattened parameter."""
    out = []
    for name, shape in SHAPES.items():
        numel = int(torch.Size(shape).numel())
        n = -(-numel // world)
        start, valid = rank * n, max(0, min(n, numel - rank * n))
        view = (lambda key, nm=name, s=start, v=valid: _full(step, key or "weight", nm).reshape(-1)[s:s + v])
        out.append(Z.Fragment(name, torch.Size(shape), start, valid, view))
    return out


class _Engine:
    """What ``Checkpointer.save`` asks of a DeepSpeed engine, with one buffer."""

    def __init__(self) -> None:
        self.module = torch.nn.Module()
        self.module.register_buffer("table", torch.arange(6, dtype=torch.int64).view(2, 3))
        self.optimizer = SimpleNamespace(state={})

    def zero_optimization_stage(self) -> int:
        return 3


def _save_as_rank(rank: int, world: int, store: str, root: str, config: str, step: int, env: dict, pause: float,
                  ready=None, fail_rank: int = -1, errors=None, slow_rank: int = -1) -> None:
    """One rank of a real gloo group that saves the synthetic state of ``step`` and exits; with ``fail_rank`` that
    rank's write fails after its shard, and every rank puts the error it raised on ``errors``."""
    os.environ.update(env)  # the fork server started before the S3 fixture set the endpoint and credentials
    storage.configure(storage.StorageConfig())
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    frags = _frags(rank, world, step)
    ema = SimpleNamespace(shadow={f.name: _full(step, "ema", f.name).reshape(-1)[f.start:f.start + f.numel]
                                  for f in frags})
    loader = SimpleNamespace(state_dict=lambda: {"rank": rank, "step": step})

    def between_files(s: int) -> None:
        time.sleep(pause if slow_rank in (-1, rank) else 0.0)
        if rank == fail_rank:
            raise OSError(f"injected write failure on rank {rank}")

    ckpt = TS.Checkpointer(C.CheckpointManager(root, keep_last=3), config, "hash", between_files=between_files)
    if ready is not None and rank == 0:
        ready.set()
    try:
        ckpt.save(_Engine(), frags, ema, loader, TS.TrainState(step=step, samples=step * 8))
        if slow_rank >= 0:  # what this rank adds to the step's all-reduce while its write is in flight
            errors.put((rank, len(ckpt.status())))
        ckpt.finish()
    except TS.CheckpointWriteError as e:
        errors.put((rank, str(e)))
        raise SystemExit(3)
    dist.destroy_process_group()


def _intact(url: str, step: int, world: int = 4) -> bool:
    """The checkpoint holds step ``step``'s state, consolidated from its shards, and every rank's loader state."""
    index = S.ShardIndex(url, C.read_json(storage.join(url, "index.json")))
    for kind in S.KINDS:
        full = index.full(kind)
        if not all(torch.equal(full[n], _full(step, kind, n)) for n in SHAPES):
            return False
    return torch.equal(index.buffer_tensors()["table"], _Engine().module.table) and \
        all(C.read_json(storage.join(url, "loader", f"rank{r}.json")) == {"rank": r, "step": step}
            for r in range(world))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_is_safetensors_and_any_element_range_reads_back(where, tmp_path, request):
    """Shards written by 4 ranks hold plain safetensors; their index reassembles every tensor and gives the slices
    of another layout (3 ranks), which is what a resharding resume reads. On S3 the server serves exactly the
    bytes of those slices, in ranged GETs."""
    from safetensors import safe_open

    root = str(tmp_path / "ck") if where == "local" else request.getfixturevalue("recorded_bucket")[0] + "/ck"
    layouts = []
    for r in range(4):
        frags = _frags(r, 4, 1)
        plan = S.ShardPlan(r, [(f"{k}/{f.name}", f.start, f.numel) for k in S.KINDS for f in frags],
                           dict(_Engine().module.named_buffers()) if r == 0 else {})
        data = S.HostBuffer().stage(plan, lambda key, fr={f.name: f for f in frags}: (
            _Engine().module.table if key.startswith("buffer/") else fr[key.split("/", 1)[1]].view(key.split("/")[0])))
        S.write_shard(storage.join(root, S.shard_file(r)), plan, data)
        layouts.append(plan.layout())
        if where == "local":
            with safe_open(str(tmp_path / "ck" / S.shard_file(r)), framework="pt") as f:  # a standard reader agrees
                f0 = frags[0]
                assert torch.equal(f.get_tensor(f"exp_avg/{f0.name}"), f0.view("exp_avg"))
    index = S.ShardIndex(root, S.build_index(layouts, SHAPES))
    assert all(torch.equal(index.full("ema")[n], _full(1, "ema", n)) for n in SHAPES)
    if where == "s3":
        bucket, rec = request.getfixturevalue("recorded_bucket")
        before = len(rec.log)
    for r in range(3):
        for f in _frags(r, 3, 1):
            out = torch.empty(f.numel)
            index.fill([(f"exp_avg_sq/{f.name}", f.start, out)])
            assert torch.equal(out, f.view("exp_avg_sq")), (r, f.name)
    if where == "s3":
        gets = [q for q in rec.log[before:] if q.method == "GET"]
        assert all(q.range for q in gets) and sum(q.bytes_out for q in gets) == 4 * sum(
            int(torch.Size(s).numel()) for s in SHAPES.values())  # each fp32 element once, nothing more
    with pytest.raises(KeyError, match="elements"):
        index.fill([("weight/a.bias", 3, torch.empty(5))])  # past the parameter's end


def _saved_by_4_ranks(root: str, tmp_path: Path) -> None:
    """A complete checkpoint at ``root`` (step 4) written by a real 4-rank group."""
    store = _store()
    ctx = mp.get_context("forkserver")
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    procs = [ctx.Process(target=_save_as_rank, args=(r, 4, store, root, str(tmp_path / "config.yaml"), 4, env, 0.0))
             for r in range(4)]
    for p in procs:
        p.start()
    _join(procs)
    assert [p.exitcode for p in procs] == [0] * 4


def _join(procs: list, timeout: float = 60) -> None:
    """Wait for every rank; kill any still running after ``timeout`` (a rank blocked in a collective)."""
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)


def _store() -> str:
    """A fresh rendezvous file for one group: a file store, not a TCP port (a free port found here can be taken by a
    test on the other xdist worker before rank 0 binds it: EADDRINUSE)."""
    import tempfile

    return f"file://{tempfile.mkdtemp(prefix='tessera-pg-')}/store"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_complete_marks_a_checkpoint_for_every_reader(where, tmp_path, request):
    """A step dir with some files, or every file but ``COMPLETE`` (a save killed just before its marker), is not a
    checkpoint for ``complete_steps``, ``Checkpointer.committed``, ``resolve('auto')``, ``train.resume=DIR`` or
    ``--checkpoint DIR`` (sample/export/eval); pruning deletes it once a newer checkpoint commits."""
    from tessera.trainer.inference import resolve_checkpoint

    root = str(tmp_path / "ck") if where == "local" else request.getfixturevalue("recorded_bucket")[0] + "/ck"
    (tmp_path / "config.yaml").write_text("a: 1\n")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    _saved_by_4_ranks(root, tmp_path)
    mgr = C.CheckpointManager(root, keep_last=5)
    good = storage.join(root, C.step_dirname(4))
    assert _intact(good, 4)
    for step, files in ((6, ["index.json", "shards/rank00000.safetensors"]), (8, None)):
        url = storage.join(root, C.step_dirname(step))
        for u in storage.list_prefix(good + "/"):  # every file of the good checkpoint, or only some
            rel = u[len(good) + 1:]
            if rel != C.COMPLETE and (files is None or rel in files):
                storage.write_bytes(storage.join(url, rel), storage.read_bytes(u))
    storage.write_text(storage.join(root, "latest"), C.step_dirname(8) + "\n")
    ckpt = TS.Checkpointer(mgr, str(tmp_path / "config.yaml"), "h")
    assert mgr.complete_steps() == [4] and mgr.resolve("auto") == good
    assert ckpt.committed(4) and not ckpt.committed(6) and not ckpt.committed(8)
    for step in (6, 8):
        url = storage.join(root, C.step_dirname(step))
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            mgr.resolve(url)  # train.resume=DIR
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            resolve_checkpoint(url)  # --checkpoint DIR of sample, export and eval
    assert resolve_checkpoint(good) == ("checkpoint", good)
    for u in storage.list_prefix(good + "/"):  # a newer checkpoint commits: pruning drops the incomplete ones
        if not u.endswith("/" + C.COMPLETE):
            storage.write_bytes(storage.join(mgr.staging_url(10), u[len(good) + 1:]), storage.read_bytes(u))
    mgr.commit(10)
    # Offline consolidation (what sample/export/eval read): whole tensors of each weight set, with the buffers.
    newest = mgr.resolve("auto")
    assert K.weight_sets(newest) == {"raw": "raw", "ema": "ema"} and K.pick(newest, use_ema=False) == "raw"
    for name, kind in (("raw", "weight"), ("ema", "ema")):
        full = K.read_weights(newest, name)
        assert all(torch.equal(full[n], _full(4, kind, n)) for n in SHAPES) and "buffer/table" in full
        assert K.weights_sha256(newest, name) == K.weights_sha256(good, name)  # the same weights, the same digest
    assert K.weights_sha256(good, "raw") != K.weights_sha256(good, "ema")
    seen = {u[len(root) + 1:].split("/")[0] for u in storage.list_prefix(root + "/")}
    assert seen == {C.step_dirname(4), C.step_dirname(10), "latest"}, seen
    assert mgr.complete_steps() == [4, 10] and _intact(mgr.resolve("auto"), 4)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.long)])
def test_sigkill_of_one_rank_while_saving_keeps_the_previous_checkpoint(where, tmp_path, request):
    """4 real ranks save a checkpoint; one, chosen at random, is SIGKILLed at a random moment of the save (inside
    the time an uninterrupted save takes to commit), until 10 kills landed while it was still saving: each time
    the newest complete checkpoint is the previous one, intact, and the rerun's save commits. On S3 the server's
    log shows ``COMPLETE`` published after every other object of its checkpoint."""
    from tessera.trainer.inference import resolve_checkpoint

    if where == "local":
        root = str(tmp_path / "ck")
    else:
        bucket, rec = request.getfixturevalue("recorded_bucket")
        root = bucket + "/ck"
    config = str(tmp_path / "config.yaml")
    Path(config).write_text("a: 1\n")
    mgr = C.CheckpointManager(root, keep_last=3)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}

    def group(step: int, pause: float, ready=None) -> list:
        store = _store()
        procs = [ctx.Process(target=_save_as_rank, args=(r, 4, store, root, config, step, env, pause, ready))
                 for r in range(4)]
        for p in procs:
            p.start()
        return procs

    ready = ctx.Event()
    first = group(1, 0.25, ready)  # an uninterrupted save, timed up to its commit: the kills aim inside that window
    assert ready.wait(60)
    t0 = time.monotonic()
    while not storage.exists(storage.join(root, C.step_dirname(1), C.COMPLETE)) and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    window = 0.8 * (time.monotonic() - t0)  # at least 4 pauses of 0.25 s, longer on a loaded machine
    _join(first)
    rnd, where_killed, step = random.SystemRandom(), [], 1
    while len(where_killed) < 10:
        step += 1
        assert step < 30, f"too few kills landed inside a save: {where_killed}"
        ready = ctx.Event()
        procs = group(step, 0.25, ready)
        assert ready.wait(60)
        victim, delay = rnd.randrange(4), rnd.uniform(0.0, window)
        time.sleep(delay)
        if not procs[victim].is_alive():  # this save ran faster than the timed one: complete, and not a kill
            _join(procs)
            assert mgr.resolve("auto") == storage.join(root, C.step_dirname(step))
            continue
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].join(10)
        assert procs[victim].exitcode == -signal.SIGKILL, f"rank {victim} ended before the kill at {delay:.2f} s"
        for p in procs:  # the launcher tears the group down (survivors may be blocked on the dead rank)
            if p.is_alive():
                p.kill()
            p.join(10)
        staged = storage.list_prefix(mgr.staging_url(step) + "/")
        where_killed.append((victim, round(delay, 2), len(staged)))
        assert not storage.exists(storage.join(mgr.staging_url(step), C.COMPLETE)), "the kill came after the commit"
        killed = storage.join(root, C.step_dirname(step))  # on S3 the prefix holds what was written before the kill
        for refuse in (mgr.resolve, resolve_checkpoint):  # as train.resume=DIR and as --checkpoint DIR
            with pytest.raises(FileNotFoundError):
                refuse(killed)
        newest = mgr.resolve("auto")
        assert newest == storage.join(root, C.step_dirname(step - 1)), (where_killed, newest)
        assert _intact(newest, step - 1)
        rerun = group(step, 0.0)  # the rerun saves the step again, completely
        _join(rerun)
        assert [p.exitcode for p in rerun] == [0] * 4
        assert mgr.resolve("auto") == storage.join(root, C.step_dirname(step)) and _intact(mgr.resolve("auto"), step)
    assert mgr.complete_steps() == [step - 2, step - 1, step]
    # Kills landed on several ranks and at several points of the write (S3 shows an object only once it is whole).
    points = len({n for _, _, n in where_killed})
    assert len({v for v, _, _ in where_killed}) >= 2 and points >= (3 if where == "local" else 2), where_killed
    if where == "s3":  # COMPLETE is published after every other object of its checkpoint, as the server saw it
        for step in mgr.complete_steps():
            reqs = rec.requests(bucket[len("s3://"):], f"ck/{C.step_dirname(step)}/")
            rerun = max(r.seq for r in reqs if r.method == "DELETE")  # the rerun's prepare cleared the prefix
            pubs = [r for r in reqs if r.publishes and r.seq > rerun]
            marker = [r for r in pubs if r.key.endswith("/" + C.COMPLETE)]
            others = [r for r in pubs if not r.key.endswith("/" + C.COMPLETE)]
            assert len(marker) == 1 and len({r.key for r in others}) == 4 * 3 + 3, [r.key for r in pubs]
            assert marker[0].start > max(r.end for r in others), "COMPLETE was published before another file"


def test_a_failed_write_on_one_rank_fails_every_rank_and_commits_nothing(tmp_path):
    """Rank 2 of 4 fails to write its files: every rank raises, naming rank 2 and its error, and no ``COMPLETE``
    appears, although ranks 0, 1 and 3 wrote theirs: the previous checkpoint stays the newest."""
    root, config = str(tmp_path / "ck"), str(tmp_path / "config.yaml")
    Path(config).write_text("a: 1\n")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    errors = ctx.Queue()
    for step, fail in ((1, -1), (2, 2)):
        store = _store()
        procs = [ctx.Process(target=_save_as_rank, args=(r, 4, store, root, config, step, {}, 0.0, None, fail, errors))
                 for r in range(4)]
        for p in procs:
            p.start()
        _join(procs)
        assert [p.exitcode for p in procs] == ([0] * 4 if fail < 0 else [3] * 4)
    got = sorted(errors.get(timeout=5) for _ in range(4))
    assert [r for r, _ in got] == [0, 1, 2, 3]
    assert all("checkpoint step 2: writing failed on rank 2: OSError: injected write failure on rank 2" in m
               for _, m in got), got
    staged = Path(C.CheckpointManager(root).staging_url(2))
    assert {p.name for p in (staged / "shards").iterdir()} == {S.shard_file(r)[len("shards/"):] for r in range(4)}
    assert not (staged / C.COMPLETE).exists() and C.CheckpointManager(root).resolve("auto").endswith("step_000000001")


def test_async_writer_reports_its_state_and_serialises():
    w, order = C.AsyncWriter(), []
    assert w.code() == 0
    w.submit(1, lambda: (time.sleep(0.2), order.append(1)))
    assert w.code() == 0  # running
    w.submit(2, lambda: order.append(2))  # waits for write 1 first
    w.join()
    assert order == [1, 2] and w.code() >= 1.0
    w.submit(3, lambda: 1 / 0)
    w.join()
    assert w.code() == -1 and "ZeroDivisionError" in w.error
    with pytest.raises(RuntimeError, match="writing checkpoint step 3 failed"):
        w.wait()


def test_collective_device_follows_the_group_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert collective_device("nccl", cpu) == torch.device("cuda", 0)  # a pure NCCL group takes only CUDA tensors
    assert collective_device("cpu:gloo,cuda:nccl", cuda) == cuda  # on-device flags, one host sync
    assert collective_device("cpu:gloo,cuda:nccl", cpu) == cpu
    assert collective_device("gloo", cpu) == cpu


def test_run_id_comes_from_config_then_launcher(monkeypatch):
    for k in ("TESSERA_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert shared_run_id("mine", lambda: "new") == "mine"
    assert shared_run_id(None, lambda: "new") == "new"  # one process: its own new id
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: not an id
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert shared_run_id(None, lambda: "new") == "slurm-4242"  # a requeued job continues its run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert shared_run_id(None, lambda: "new") == "job7"


def test_writer_state_in_the_step_all_reduce_has_a_fixed_size_and_the_slowest_rank_is_found(tmp_path):
    """Each rank adds 3 numbers to the step's all-reduce, at 2 ranks as at 4 (not one per rank); which rank wrote
    slowest is asked only once all have written, and the checkpoint's timing names it (rank 3, made slow)."""
    config = str(tmp_path / "config.yaml")
    Path(config).write_text("a: 1\n")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    for world in (2, 4):
        root, errors, store = str(tmp_path / f"ck{world}"), ctx.Queue(), _store()
        procs = [ctx.Process(target=_save_as_rank, args=(r, world, store, root, config, 1, {}, 0.4, None, -1, errors,
                                                         world - 1)) for r in range(world)]
        for p in procs:
            p.start()
        _join(procs)
        assert [p.exitcode for p in procs] == [0] * world
        assert sorted(errors.get(timeout=5) for _ in range(world)) == [(r, 3) for r in range(world)]
        save = C.read_json(storage.join(C.CheckpointManager(root).resolve("auto"), "trainer_state.json"))["save"]
        assert save["slowest_rank"] == world - 1 and save["write_s"] >= 0.4 and save["world_size"] == world, save
