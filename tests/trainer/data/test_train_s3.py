"""`tessera train` on loopback S3 with 4 ranks x 2 loader workers declared as 2 nodes of 2 ranks (each "node" its
own shard cache): one epoch reads each shard about once per node, as the S3 server counts, and trains on every
sample exactly once (the trainer's debug.record_keys). The same run on one node reads each shard exactly once."""

from __future__ import annotations

import json

import pytest

from tests.trainer import helpers as H
from tests.trainer.data.dataset_factory import write_dataset

pytestmark = [pytest.mark.s3, pytest.mark.distributed, pytest.mark.slow]

SHARDS, PER_SHARD, BATCH = 26, 8, 13  # 208 samples: 8 readers of 26 = 2 batches of 13 each, spans end mid-shard


@pytest.fixture(scope="module")
def work(tmp_path_factory, counting):
    tmp = tmp_path_factory.mktemp("train-s3")
    enc = H.tiny_text_encoder(tmp / "enc")
    return tmp, enc


def _train(work, counting, ds, run_id: str, ranks_per_node: int) -> list[str]:
    tmp, enc = work
    counting.traffic.reset()
    ovs = H.overrides(tmp, run_id, ds.root, enc, **{
        "data.num_workers": 2, "data.batch_size": BATCH, "data.epochs": 1, "data.shuffle_buffer": 16,
        "data.ranks_per_node": ranks_per_node, "data.cache_dir": str(tmp / run_id / "cache" / "node{node}"),
        "train.total_samples": SHARDS * PER_SHARD, "debug.record_keys": "true"})
    H.check(H.run_train(ovs, nproc=4, AWS_ENDPOINT_URL=counting.endpoints[0]))
    keys = []
    for r in range(4):
        for line in (tmp / "runs" / run_id / "keys" / f"rank{r}.jsonl").read_text().splitlines():
            keys += json.loads(line)["keys"]
    return keys


def test_one_epoch_on_two_nodes_reads_each_shard_once_per_node(work, counting, s3_bucket) -> None:
    ds = write_dataset(f"{s3_bucket}/ds", shards=SHARDS, per_shard=PER_SHARD, seed=4, smooth=True,
                       variants={"alt": 1.0}, buckets={"16x16": 1.0})
    sizes = {"/" + ds.shard_url(i)[len("s3://"):]: sh["bytes"] for i, sh in enumerate(ds.manifest["shards"])}
    total = sum(sizes.values())

    keys = _train(work, counting, ds, "two-nodes", ranks_per_node=2)
    assert sorted(keys) == sorted(ds.keys)  # every sample exactly once
    served = {p: counting.traffic.bytes_of(p) for p in sizes}
    assert all(sizes[p] <= n <= 2 * sizes[p] for p, n in served.items())  # every shard read, at most once per node
    assert sum(served.values()) <= 1.1 * total * 2
    for node in (0, 1):  # each node's cache holds its own half of the shards
        cached = list((work[0] / "two-nodes" / "cache" / f"node{node}").glob("*.tar"))
        assert 0.4 * SHARDS <= len(cached) <= 0.6 * SHARDS + 1

    keys = _train(work, counting, ds, "one-node", ranks_per_node=4)
    assert sorted(keys) == sorted(ds.keys)
    assert {p: counting.traffic.bytes_of(p) for p in sizes} == sizes  # one node: each shard exactly once
