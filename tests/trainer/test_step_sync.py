"""A training step that does not log never waits for the device (issue #30): host syncs are counted from outside
the loop by tests/fixtures/sync_counter (wrapping ``item``, ``tolist``, ``cpu``, ``bool()`` ... and charging each
call to the nearest caller frame that is not torch), per training step, in a real ``tessera train`` process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed]

COUNTER = H.ROOT / "tests" / "fixtures" / "sync_counter"


def test_steps_that_do_not_log_make_no_host_sync(tmp_path):
    """12 steps of 4 samples: logs at steps 6 and 12 (every 24 samples), the agreed flags read at steps 5 and 10
    (host_sync_every_steps=5), condition dropout and the EMA on. Every other step's window (from one
    ``train_step`` call to the next, the loop's bookkeeping included) has no sync in Tessera's code; the logging
    and flag-reading windows do (the counter sees them), and DeepSpeed's own overflow check is not ours."""
    enc = H.tiny_text_encoder(tmp_path / "enc")
    H.tiny_dataset(tmp_path / "ds")
    log = tmp_path / "syncs.json"
    ovs = H.overrides(tmp_path, "sync", str(tmp_path / "ds"), enc, **{
        "train.log_every_samples": 24, "train.host_sync_every_steps": 5, "train.total_samples": 48,
        "cfg_dropout.p": 0.5, "cfg_dropout.mode": "empty", "train.deterministic": "false"})
    out = H.run_train(ovs, PYTHONPATH=f"{COUNTER}:{H.ROOT}", TESSERA_SYNC_LOG=str(log),
                      TESSERA_SYNC_ROOT=str(H.ROOT))
    H.check(out)
    dumps = [json.loads(p.read_text()) for p in tmp_path.glob("syncs.json.*")]
    trainer = [d for d in dumps if d["patched"]]
    assert len(trainer) == 1, f"expected one training process, got {[d['patched'] for d in dumps]}"
    windows = {int(k): v for k, v in trainer[0]["windows"].items()}
    # Window k follows train_step(step=k), after which the loop's counter is k + 1.
    sync_steps = {5, 6, 10, 12}
    quiet = [k for k in range(1, 11) if k + 1 not in sync_steps]
    assert {k: windows[k] for k in quiet if windows.get(k)} == {}, "host syncs in steps that do not log"
    for k in (4, 5, 9):  # the counter does see the reads of the logging and flag-reading steps
        assert any("loop.py" in where or "metrics.py" in where for where, _ in windows.get(k, [])), (k, windows)
