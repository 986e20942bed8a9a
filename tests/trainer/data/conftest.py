"""Fixtures for the training data loader tests: small datasets on local disk, and S3 servers (the session's moto
server from tests.fixtures, and a counting one)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tessera import storage
from tests.fixtures.s3 import s3_bucket, s3_server  # noqa: F401  (fixtures used by the S3 tests)
from tests.trainer.data.dataset_factory import DatasetInfo, write_dataset
from tests.trainer.data.s3_counting import CountingS3

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    """4 shards x 24 samples over buckets 16x16 / 16x32 / 32x16, two caption variants."""
    return write_dataset(str(tmp_path_factory.mktemp("ds")), shards=4, per_shard=24, seed=1)


@pytest.fixture(scope="module")
def counting(s3_server: str) -> Iterator[CountingS3]:  # noqa: F811
    """A loopback S3 server on two ports ("nodes") that counts the bytes it serves per object."""
    srv = CountingS3(ports=2).start()
    yield srv
    srv.stop()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point this process (and the loader workers it forks) at an S3 endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    storage.configure(storage.StorageConfig())
