"""Fixtures for the training data loader tests: small datasets on local disk (and S3 via tests.fixtures)."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.s3 import s3_bucket, s3_server  # noqa: F401  (fixtures used by test_s3.py)
from tests.trainer.data.dataset_factory import DatasetInfo, write_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    """4 shards x 24 samples over buckets 16x16 / 16x32 / 32x16, two caption variants."""
    return write_dataset(str(tmp_path_factory.mktemp("ds")), shards=4, per_shard=24, seed=1)
