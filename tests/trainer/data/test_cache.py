"""Bad input on S3: a missing shard, a cut-off download, an object changed mid-download, a size mismatch, a cache
too small, a full disk, a stuck lock. Each is a counted hole naming the shard or a clear error -- never a hang --
and a rerun continues. Served bytes and faults come from the counting loopback server."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
from pathlib import Path

import pytest

from tests.trainer.data.conftest import use_endpoint
from tests.trainer.data.dataset_factory import DatasetInfo, write_dataset
from tests.trainer.data.s3_counting import Fault
from tessera import storage
from tessera.trainer.data import LoaderConfig, build_loader
from tessera.trainer.data.cache import CacheFull

pytestmark = pytest.mark.s3


def _run(ds: DatasetInfo, cache: Path, **kw) -> tuple[set[str], dict]:
    base = dict(path=ds.root, batch_size=1, num_workers=0, seed=1, shuffle_buffer=1, epochs=1, cache_dir=str(cache))
    loader = build_loader(LoaderConfig(**{**base, **kw}), 0, 1)
    return {k for b in loader for k in b["key"]}, loader.stats()


@pytest.fixture
def ds(s3_bucket: str, counting, monkeypatch) -> DatasetInfo:
    """4 shards of 4 samples, each over 1 MiB (two 1 MiB ranges), through the counting server."""
    use_endpoint(monkeypatch, counting.endpoints[0])
    counting.faults.clear()
    return write_dataset(f"{s3_bucket}/ds", shards=4, per_shard=4, seed=6, buckets={"16x16": 1}, pad=300_000)


def _path(ds: DatasetInfo, i: int) -> str:
    return "/" + ds.shard_url(i)[len("s3://"):]


def test_missing_shard_is_a_counted_hole_and_a_rerun_reads_it(ds: DatasetInfo, tmp_path: Path) -> None:
    data = storage.read_bytes(ds.shard_url(1))
    storage.delete(ds.shard_url(1))
    keys, st = _run(ds, tmp_path)
    assert keys == set(ds.keys) - set(ds.shard_keys[1])
    assert st["bad_shards"] == {"0:shards/00001.tar": "missing_shard"} and st["skipped_samples"]["missing_shard"] == 4
    storage.write_bytes(ds.shard_url(1), data)
    assert _run(ds, tmp_path)[0] == set(ds.keys)  # same cache dir: nothing poisoned


def test_a_cut_off_download_resumes_at_its_offset(ds: DatasetInfo, counting, tmp_path: Path) -> None:
    counting.faults[_path(ds, 2)] = Fault(truncate=1)
    counting.traffic.reset()
    keys, st = _run(ds, tmp_path, download_part_mb=1)
    assert keys == set(ds.keys) and st["shard_cache"]["range_retries"] == 1 and not st["bad_shards"]
    # the cut-off range went on from where it broke: every byte served once, in one more request
    assert counting.traffic.bytes_of(_path(ds, 2)) == ds.manifest["shards"][2]["bytes"]
    assert sum(n for (_, p), n in counting.traffic.gets.items() if p == _path(ds, 2)) == 3


def test_a_download_cut_off_every_time_is_a_counted_hole(ds: DatasetInfo, counting, tmp_path: Path) -> None:
    counting.faults[_path(ds, 0)] = Fault(truncate=100)
    keys, st = _run(ds, tmp_path)
    assert st["bad_shards"] == {"0:shards/00000.tar": "unreadable_shard"} and keys == set(ds.keys) - set(
        ds.shard_keys[0])
    assert not list(tmp_path.glob("*.part.*"))  # no half-written file left behind
    counting.faults.clear()
    assert _run(ds, tmp_path)[0] == set(ds.keys)


def test_an_object_changed_during_the_download_is_a_counted_hole(ds: DatasetInfo, counting, tmp_path: Path) -> None:
    counting.faults[_path(ds, 3)] = Fault(etag="another-version")  # ranges after the first answer another ETag
    keys, st = _run(ds, tmp_path, download_part_mb=1)
    assert st["bad_shards"] == {"0:shards/00003.tar": "unreadable_shard"}
    assert keys == set(ds.keys) - set(ds.shard_keys[3])
    counting.faults.clear()
    assert _run(ds, tmp_path, download_part_mb=1)[0] == set(ds.keys)


@pytest.mark.parametrize("change", [b"extra bytes", -100])
def test_a_size_mismatch_is_a_counted_corrupt_shard(ds: DatasetInfo, tmp_path: Path, change) -> None:
    data = storage.read_bytes(ds.shard_url(2))
    storage.write_bytes(ds.shard_url(2), data + change if isinstance(change, bytes) else data[:change])
    keys, st = _run(ds, tmp_path, verify="never")  # the size alone, without the hash, catches it
    assert st["bad_shards"] == {"0:shards/00002.tar": "corrupt_shard"}
    assert keys == set(ds.keys) - set(ds.shard_keys[2])


def test_a_cache_too_small_is_a_clear_error_and_a_rerun_with_room_continues(ds: DatasetInfo, tmp_path: Path) -> None:
    cfg = dict(path=ds.root, batch_size=1, num_workers=2, seed=1, shuffle_buffer=1, epochs=1,
               cache_dir=str(tmp_path), cache_gb=1e-4)  # 107 KB: less than one shard
    loader = build_loader(LoaderConfig(**cfg), 0, 1)
    with pytest.raises(CacheFull, match=r"shard 0:shards/0000\d\.tar .* larger than the shard cache bound"):
        list(loader)
    assert not multiprocessing.active_children()  # its workers are gone: nothing left to hang the exit
    rerun = build_loader(LoaderConfig(**{**cfg, "cache_gb": 0.01}), 0, 1)
    rerun.load_state_dict(loader.state_dict())
    assert {k for b in rerun for k in b["key"]} == set(ds.keys)


def test_a_full_disk_is_a_clear_error(ds: DatasetInfo, tmp_path: Path, monkeypatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(CacheFull, match="no space left on the cache disk"):
        _run(ds, tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.part.*")) and _run(ds, tmp_path)[0] == set(ds.keys)


def test_a_stuck_lock_times_out_naming_the_shard(ds: DatasetInfo, tmp_path: Path) -> None:
    """A download lock held elsewhere (a process stuck on this node) ends in an error, not a hang."""
    tmp_path.mkdir(exist_ok=True)
    locks = []
    for sh in ds.manifest["shards"]:
        fd = os.open(tmp_path / f"{sh['sha256']}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        locks.append(fd)
    with pytest.raises(TimeoutError, match=r"shard 0:shards/0000\d\.tar: waited 1 s for the cache lock"):
        _run(ds, tmp_path, lock_timeout_s=1.0)
    for fd in locks:
        os.close(fd)
    assert _run(ds, tmp_path)[0] == set(ds.keys)


def test_a_bounded_cache_evicts_least_recently_used_shards(ds: DatasetInfo, counting, tmp_path: Path) -> None:
    size = max(sh["bytes"] for sh in ds.manifest["shards"])
    bound = 2.5 * size  # room for two shards
    keys, st = _run(ds, tmp_path, cache_gb=bound / 2**30, prefetch_shards=0, lock_timeout_s=5)
    assert keys == set(ds.keys) and st["shard_cache"]["evictions"] >= 2
    assert sum(p.stat().st_size for p in tmp_path.glob("*.tar")) <= bound
