"""tessera.storage against the local filesystem and a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from tessera import storage
from tessera.storage import MiB, StorageConfig, s3
from tests.fixtures.s3 import seed_objects
from tests.fixtures.s3_recorder import recorded_bucket, s3_recorder  # noqa: F401 (fixtures)


class Boom(RuntimeError):
    """Raised inside an atomic_write block to interrupt it."""


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """botocore's own backoff, scaled down (1 s per throttled retry would dominate these tests)."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "_DEFAULT_BACKOFF_CONFIG",
                        {"throttling_base_scale": 0.01, "non_throttling_base_scale": 0.01})
    storage.configure(StorageConfig())
    yield
    storage.configure(StorageConfig())


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A writable root url: a temp directory, or a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket")


def _bucket_key(url: str) -> tuple[str, str]:
    return s3.split_url(url)


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------- both backends


def test_round_trip(root: str) -> None:
    url = storage.join(root, "a", "b.txt")
    storage.write_text(url, "héllo")
    assert storage.read_text(url) == "héllo"
    storage.write_bytes(url, b"\x00\x01")  # overwrite is allowed by default
    assert storage.read_bytes(url) == b"\x00\x01"
    with storage.atomic_write(storage.join(root, "c.bin")) as f:
        f.write(b"x" * 10)
        f.write(memoryview(b"yz"))
    assert storage.read_bytes(storage.join(root, "c.bin")) == b"x" * 10 + b"yz"
    assert storage.list_prefix(root) == [storage.join(root, "a/b.txt"), storage.join(root, "c.bin")]


def test_exists_delete_copy(root: str, tmp_path) -> None:
    src, dst = storage.join(root, "src.bin"), storage.join(root, "sub", "dst.bin")
    assert not storage.exists(src)
    storage.write_bytes(src, b"payload")
    assert storage.exists(src)
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == b"payload"
    # Across backends the copy streams through atomic_write.
    other = str(tmp_path / "other" / "x.bin")
    storage.copy(dst, other)
    storage.copy(other, storage.join(root, "back.bin"))
    assert storage.read_bytes(storage.join(root, "back.bin")) == b"payload"
    storage.delete(src)
    assert not storage.exists(src)
    storage.delete(src)  # idempotent, as on S3
    assert storage.list_prefix(root) == [storage.join(root, "back.bin"), dst]


def test_create_only_refuses_overwrite(root: str) -> None:
    url = storage.join(root, "once.txt")
    storage.write_text(url, "first", create_only=True)
    with pytest.raises(FileExistsError, match="once.txt"):
        storage.write_text(url, "second", create_only=True)
    assert storage.read_text(url) == "first"


def test_create_only_race_is_decided_at_publish_time(root: str) -> None:
    """Two writers both pass the early check; the one that publishes second must fail."""
    url = storage.join(root, "race.txt")
    with pytest.raises(FileExistsError, match="race.txt"):
        with storage.atomic_write(url, create_only=True) as f:
            f.write(b"loser")
            storage.write_text(url, "winner", create_only=True)
    assert storage.read_text(url) == "winner"


def test_open_read_streams_a_tar(root: str) -> None:
    members = {f"{i:05d}.txt": f"caption {i}".encode() * 50 for i in range(20)}
    url = storage.join(root, "shard.tar")
    storage.write_bytes(url, _tar_bytes(members))
    got = {}
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            got[info.name] = tar.extractfile(info).read()
    assert got == members


def test_interrupted_small_write_leaves_nothing(root: str) -> None:
    url = storage.join(root, "dir", "partial.bin")
    with pytest.raises(Boom):
        with storage.atomic_write(url) as f:
            f.write(b"half")
            raise Boom
    assert not storage.exists(url)
    assert storage.list_prefix(root) == []


def test_missing_errors_name_the_url(root: str) -> None:
    url = storage.join(root, "nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(url)
    assert storage.list_prefix(storage.join(root, "nothing-here")) == []


def test_list_prefix_is_directory_scoped(root: str) -> None:
    for name in ("runs/a/x", "runs/a/y/z", "runs/ab/w"):
        storage.write_bytes(storage.join(root, name), b".")
    assert storage.list_prefix(storage.join(root, "runs/a")) == [
        storage.join(root, "runs/a/x"),
        storage.join(root, "runs/a/y/z"),
    ]


# --------------------------------------------------------------------------- local only


def test_local_failure_leaves_no_temp_files(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with storage.atomic_write(str(target)) as f:
            f.write(b"new")
            raise Boom
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    with pytest.raises(FileExistsError):
        storage.write_bytes(str(target), b"x", create_only=True)
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_local_mode_follows_umask(tmp_path) -> None:
    url = str(tmp_path / "m.txt")
    storage.write_text(url, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask


def test_urls() -> None:
    assert storage.join("s3://b", "x/", "/y") == "s3://b/x/y"
    assert storage.join("s3://b/p/", "q") == "s3://b/p/q"
    assert storage.join("/tmp/a", "/b") == "/tmp/a/b"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3://")
    assert str(storage.local_path("file:///tmp/x")) == "/tmp/x"
    with pytest.raises(ValueError, match="s3://b/k"):
        storage.local_path("s3://b/k")
    with pytest.raises(ValueError, match="no bucket"):
        storage.exists("s3:///k")
    with pytest.raises(ValueError, match="multipart_chunk_mb"):
        StorageConfig(multipart_chunk_mb=4)
    with pytest.raises(ValueError, match="retry_mode"):
        StorageConfig(retry_mode="legacy")  # type: ignore[arg-type]


def test_buffers_written_as_one_object_and_byte_ranges_read_into_views(root: str) -> None:
    """write_buffers joins its buffers (no joined copy needed); read_ranges scatters ranges into views."""
    import numpy as np

    head, body = b"HEAD" * 3, np.arange(5000, dtype=np.uint8)
    url = storage.join(root, "sub", "obj.bin")
    storage.write_buffers(url, [head, body])
    data = head + body.tobytes()
    assert storage.read_bytes(url) == data
    a, b, c = bytearray(7), np.zeros(100, np.uint8), bytearray(3)
    storage.read_ranges(url, [(10, [a]), (2000, [memoryview(b), c])])  # one range scattered into two buffers
    assert bytes(a) == data[10:17] and b.tobytes() + bytes(c) == data[2000:2103]
    with pytest.raises(Exception, match="obj.bin"):
        storage.read_ranges(url, [(len(data) - 2, [bytearray(5)])])  # past the end: an error naming the object


# --------------------------------------------------------------------------- S3 only


@pytest.mark.s3
def test_a_large_object_moves_as_concurrent_parts_and_ranged_gets(recorded_bucket, monkeypatch) -> None:
    """Seen from the server: the parts of one upload overlap in time and CompleteMultipartUpload comes after every
    part; four ranged reads fetch their bytes only, concurrently. A failing part aborts the upload."""
    bucket_url, rec = recorded_bucket
    storage.configure(StorageConfig(multipart_chunk_mb=5, transfer_workers=4))
    body = os.urandom(24 * MiB)
    url = storage.join(bucket_url, "shard.bin")
    storage.write_buffers(url, [b"hdr", memoryview(body)])
    assert storage.read_bytes(url) == b"hdr" + body
    reqs = rec.requests(s3.split_url(bucket_url)[0], "shard.bin")
    parts = [r for r in reqs if r.method == "PUT" and "partNumber" in r.query]
    done = [r for r in reqs if r.method == "POST" and "uploadId" in r.query]
    assert len(parts) == 5 and sum(p.bytes_in for p in parts) == 24 * MiB + 3 and len(done) == 1
    assert done[0].start > max(p.end for p in parts)
    assert _max_overlap(parts) >= 2, "the parts went up one at a time"
    before = len(rec.log)
    views = [bytearray(3 * MiB) for _ in range(4)]
    storage.read_ranges(url, [(1 + i * 6 * MiB, [v]) for i, v in enumerate(views)])
    assert all(bytes(v) == (b"hdr" + body)[1 + i * 6 * MiB: 1 + i * 6 * MiB + 3 * MiB] for i, v in enumerate(views))
    gets = [r for r in rec.log[before:] if r.method == "GET" and r.key == "shard.bin"]
    assert len(gets) == 4 and all(g.range for g in gets) and sum(g.bytes_out for g in gets) == 12 * MiB
    assert _max_overlap(gets) >= 2, "the ranged GETs ran one at a time"

    real = s3.call

    def flaky(u, op, **kw):
        if op == "upload_part" and kw["PartNumber"] == 3:
            raise storage.StorageError(f"S3 upload_part failed (injected): {u}")
        return real(u, op, **kw)

    monkeypatch.setattr(s3, "call", flaky)
    broken = storage.join(bucket_url, "broken.bin")
    with pytest.raises(OSError, match="broken.bin"):
        storage.write_buffers(broken, [memoryview(body)])
    bucket, _ = _bucket_key(broken)
    assert not storage.exists(broken) and "Uploads" not in s3.client().list_multipart_uploads(Bucket=bucket)


def _max_overlap(reqs) -> int:
    """Most requests in flight at one moment, from the server's start and end times."""
    edges = sorted([(r.start, 1) for r in reqs] + [(r.end, -1) for r in reqs], key=lambda e: (e[0], e[1]))
    depth = best = 0
    for _, d in edges:
        depth += d
        best = max(best, depth)
    return best


@pytest.mark.s3
def test_multipart_upload_over_8mib(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "big.bin")
    data = os.urandom(9 * MiB + 123)
    with storage.atomic_write(url) as f:
        for i in range(0, len(data), 3 * MiB):  # several writes, as a tar writer would do
            f.write(data[i : i + 3 * MiB])
        # Parts are streaming up, but nothing is visible until the block exits.
        assert not storage.exists(url)
    bucket, key = _bucket_key(url)
    head = s3.client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-2")  # a multipart ETag: 8 MiB + the rest
    assert head["ContentLength"] == len(data)
    assert storage.read_bytes(url) == data


@pytest.mark.s3
def test_create_only_multipart(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "big-once.bin")
    bucket, _ = _bucket_key(url)
    with pytest.raises(FileExistsError, match="big-once.bin"):
        with storage.atomic_write(url, create_only=True) as f:
            f.write(b"m" * (9 * MiB))  # multipart upload under way
            storage.write_bytes(url, b"racer")  # another writer publishes first
    assert storage.read_bytes(url) == b"racer"
    assert "Uploads" not in s3.client().list_multipart_uploads(Bucket=bucket)


@pytest.mark.s3
def test_interrupted_multipart_leaves_no_object_or_upload(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "broken.bin")
    bucket, _ = _bucket_key(url)
    with pytest.raises(Boom):
        with storage.atomic_write(url) as f:
            f.write(b"z" * (9 * MiB))
            # The multipart upload exists now, with one part uploaded.
            assert len(s3.client().list_multipart_uploads(Bucket=bucket)["Uploads"]) == 1
            raise Boom
    assert not storage.exists(url)
    assert "Uploads" not in s3.client().list_multipart_uploads(Bucket=bucket)
    assert storage.list_prefix(s3_bucket) == []


@pytest.mark.s3
def test_list_more_than_1000_keys(s3_bucket: str) -> None:
    urls = [storage.join(s3_bucket, "many", f"{i:05d}.txt") for i in range(1050)]
    # 1,000 keys seeded straight into the server's backend (one HTTP PUT each would dominate the test), the
    # last 50 written concurrently through storage; the listing itself pages over HTTP.
    seed_objects(s3_bucket, [s3.split_url(u)[1] for u in urls[:1000]], b"k")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda u: storage.write_bytes(u, b"k"), urls[1000:]))
    storage.write_bytes(storage.join(s3_bucket, "other.txt"), b"o")
    assert storage.list_prefix(storage.join(s3_bucket, "many")) == urls
    assert len(storage.list_prefix(s3_bucket)) == 1051


def _inject(event: str, fail) -> list[int]:
    """Make the next matching request fail once via a botocore before-send hook; returns a call log."""
    calls: list[int] = []

    def hook(request, **_):
        calls.append(1)
        return fail() if len(calls) == 1 else None

    s3.client().meta.events.register(event, hook)
    return calls


def _error_response(status: int, code: str):
    from botocore.awsrequest import AWSResponse

    class Raw:
        def stream(self):
            yield f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()

    return AWSResponse("http://127.0.0.1/", status, {}, Raw())


def _http_503_slowdown():
    return _error_response(503, "SlowDown")


def _http_500_internal():
    return _error_response(500, "InternalError")


def _connection_drop():
    from botocore.exceptions import EndpointConnectionError

    raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


@pytest.mark.s3
@pytest.mark.parametrize(
    "mode,event,fail,reason,n_calls",
    [  # n_calls: the failed attempt, botocore's one retry, the other calls of the write
        ("standard", "before-send.s3.PutObject", _http_503_slowdown, "throttle", 2),
        ("standard", "before-send.s3.UploadPart", _http_503_slowdown, "throttle", 3),  # 2 parts
        ("standard", "before-send.s3.ListObjectsV2", _connection_drop, "connection", 2),
        ("adaptive", "before-send.s3.PutObject", _http_500_internal, "server_error", 2),
    ],
)
def test_transient_failure_is_retried_and_counted(s3_bucket: str, mode, event, fail, reason, n_calls,
                                                  caplog) -> None:
    storage.configure(StorageConfig(retry_mode=mode))
    assert s3.client().meta.config.retries["mode"] == mode  # botocore's retry mode does the retrying
    url = storage.join(s3_bucket, "flaky.bin")
    data = b"f" * (9 * MiB if "UploadPart" in event else 100)
    before = storage.retry_stats().get(reason, 0)
    calls = _inject(event, fail)
    with caplog.at_level("WARNING", logger="tessera.storage"):
        storage.write_bytes(url, data)
        assert storage.list_prefix(s3_bucket) == [url]
    assert storage.read_bytes(url) == data
    assert len(calls) == n_calls
    assert storage.retry_stats()[reason] == before + 1
    assert any(s3_bucket in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert "testing" not in caplog.text  # the dummy secret never reaches the log


@pytest.mark.s3
def test_retries_give_up_with_an_error_naming_the_url(s3_bucket: str) -> None:
    storage.configure(StorageConfig(max_retries=2))
    url = storage.join(s3_bucket, "never.bin")
    s3.client().meta.events.register("before-send.s3.PutObject", lambda **_: _http_503_slowdown())
    before = storage.retry_stats()
    with pytest.raises(storage.StorageError, match="never.bin"):
        storage.write_bytes(url, b"x")
    after = storage.retry_stats()
    assert after["throttle"] - before.get("throttle", 0) == 2
    assert after["gave_up"] - before.get("gave_up", 0) == 1


@pytest.mark.s3
def test_errors_that_are_not_transient_are_not_retried(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "denied.bin")
    calls = _inject("before-send.s3.PutObject", lambda: _error_response(403, "AccessDenied"))
    before = storage.retry_stats()
    with pytest.raises(PermissionError, match="denied.bin"):
        storage.write_bytes(url, b"x")
    assert len(calls) == 1 and storage.retry_stats() == before


@pytest.mark.s3
def test_conditional_write_conflict_is_retried(s3_bucket: str) -> None:
    """S3's 409 ConditionalRequestConflict (not in botocore's retry conditions) is retried by our hook."""
    url = storage.join(s3_bucket, "contended.txt")
    before = storage.retry_stats().get("conflict", 0)
    calls = _inject("before-send.s3.PutObject", lambda: _error_response(409, "ConditionalRequestConflict"))
    storage.write_text(url, "mine", create_only=True)
    assert storage.read_text(url) == "mine"
    assert len(calls) == 2 and storage.retry_stats()["conflict"] == before + 1


@pytest.mark.s3
def test_read_resumes_after_a_dropped_stream(s3_bucket: str, monkeypatch) -> None:
    from botocore.exceptions import ResponseStreamingError

    url = storage.join(s3_bucket, "resume.bin")
    data = os.urandom(3 * MiB)
    storage.write_bytes(url, data)
    f = storage.open_read(url)
    raw = f.raw
    real_read, state = raw._body.read, {"n": 0}

    def flaky_read(amt=None):
        state["n"] += 1
        if state["n"] == 2:  # after the first 1 MiB buffer
            raise ResponseStreamingError(error="connection reset")
        return real_read(amt)

    monkeypatch.setattr(raw._body, "read", flaky_read)
    before = storage.retry_stats().get("connection", 0)
    with f:
        assert f.read() == data
    assert storage.retry_stats()["connection"] == before + 1


@pytest.mark.s3
def test_server_side_copy_multipart_range(s3_bucket: str, monkeypatch) -> None:
    """Objects over CopyObject's 5 GiB limit are copied as ranged parts (limit lowered here)."""
    monkeypatch.setattr(s3, "_MAX_SINGLE_COPY", 1)
    src, dst = storage.join(s3_bucket, "s.bin"), storage.join(s3_bucket, "d.bin")
    data = os.urandom(9 * MiB)
    storage.write_bytes(src, data)
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == data


@pytest.mark.s3
def test_missing_bucket_and_client_cache(s3_server: str) -> None:
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-xyz/k"):
        storage.write_bytes("s3://no-such-bucket-xyz/k", b"x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-xyz"):
        storage.list_prefix("s3://no-such-bucket-xyz/")
    assert s3.client() is s3.client()
    storage.configure(StorageConfig(endpoint_url=s3_server, region="us-east-1"))
    assert s3.client().meta.endpoint_url == s3_server


def _child_reads(url: str, parent_client_id: int, queue) -> None:
    queue.put((storage.read_bytes(url), id(s3.client()) != parent_client_id))


@pytest.mark.s3
def test_forked_child_builds_its_own_client(s3_bucket: str) -> None:
    import multiprocessing

    url = storage.join(s3_bucket, "fork.txt")
    storage.write_bytes(url, b"from parent")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(url, id(s3.client()), queue))
    proc.start()
    got = queue.get(timeout=30)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert got == (b"from parent", True)


# --------------------------------------------------------------------------- dispatch


def test_unknown_scheme_is_an_error_naming_the_url() -> None:
    with pytest.raises(ValueError, match=r"gs://b/k.*known: file, s3"):
        storage.read_bytes("gs://b/k")
    assert storage.scheme("/data/s3://x") == "file" and storage.scheme("file:///x") == "file"
    assert storage.BACKENDS.get("s3") is s3 and storage.BACKENDS.get("file") is storage.local


def test_backends_do_not_import_each_other() -> None:
    import ast
    import inspect

    def imports(module) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not [m for m in imports(storage.local) if m.startswith("tessera")]
    assert not [m for m in imports(s3) | imports(storage.s3_client) if m.endswith("local")]
