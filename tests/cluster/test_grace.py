"""``tessera submit`` warns when the run being resumed took longer to save its last checkpoint than the grace
period between the preemption signal and the kill (Slurm's ``--signal`` lead time, the pod's termination grace)."""

from __future__ import annotations

import io
import json

from tessera.cluster.grace import grace_warning
from tessera.cluster.records import JobStore
from tessera.cluster.submit import SubmitRequest, build_spec, cluster_config, submit
from tessera.trainer.checkpoint import CheckpointManager
from tests.trainer import helpers as H

TINY = str(H.TINY_CONFIG)


def _run_with_a_checkpoint(runs, run_id: str, seconds: float) -> None:
    mgr = CheckpointManager(str(runs / run_id / "checkpoints"))
    url = mgr.prepare(2)
    (runs / run_id / "checkpoints" / "step_000000002.partial" / "trainer_state.json").write_text(
        json.dumps({"format": "tessera-ckpt/3", "trainer": {"step": 2}, "save": {"seconds": seconds}}))
    mgr.commit(2)
    assert url


def test_submit_warns_when_the_last_save_took_longer_than_the_grace_period(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run_with_a_checkpoint(runs, "slow", 200.0)
    _run_with_a_checkpoint(runs, "fast", 20.0)
    req = SubmitRequest(stage=["train"], config=TINY, flags={"backend": "slurm"}, dry_run=True,
                        overrides=[f"run.root={runs}", "run.id=slow", f"cluster.state_dir={tmp_path / 'jobs'}",
                                   "cluster.slurm.signal_grace_s=120"])
    submit(req, io.StringIO())
    err = capsys.readouterr().err
    assert "took 200 s to save, longer than the 120 s grace period" in err and "signal_grace_s" in err
    spec = build_spec(req, cluster_config(req), JobStore(tmp_path / "jobs"))
    spec.cluster.slurm.signal_grace_s = 300
    assert grace_warning(spec) is None
    spec.cluster.backend, spec.cluster.k8s.grace_period_s = "k8s", 60
    assert "60 s grace period" in grace_warning(spec) and "k8s.grace_period_s" in grace_warning(spec)
    spec.cluster.backend = "ray"
    assert grace_warning(spec) is None  # Ray's job stop does not wait for a checkpoint: no grace to check
    spec.cluster.backend, spec.cluster.slurm.signal_grace_s = "slurm", 120
    spec.config_text = spec.config_text.replace("id: slow", "id: fast")
    spec.run_id = "fast"
    assert grace_warning(spec) is None  # 20 s of saving fits in 120 s
    spec.run_id = "new"
    assert grace_warning(spec) is None  # a new run has no checkpoint yet
