"""Kubernetes manifests, validated offline: built-in kinds (the ConfigMap, every pod template as a core v1
PodTemplate) with ``kubernetes-validate --strict``; the RayJob and PyTorchJob with ``jsonschema`` against schemas
transcribed from their CRDs (tests/cluster/schemas). The container shell's exit-code mapping runs for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tessera.cluster.k8s import _WRAPPER
from tests.cluster.conftest import CANARIES, ROOT, cluster_overrides, submit
from tests.cluster.test_golden import GOLDEN

SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.32.0"
CRD_SCHEMAS = {"RayJob": "rayjob.ray.io-v1.schema.json", "PyTorchJob": "pytorchjob.kubeflow.org-v1.schema.json"}


def pod_templates(doc: dict) -> list[dict]:
    """Every pod template inside a RayJob or PyTorchJob."""
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    rc = doc["spec"]["rayClusterSpec"]
    return [rc["headGroupSpec"]["template"], *[w["template"] for w in rc.get("workerGroupSpecs", [])]]


def validate(docs: list[dict]) -> None:
    """Strict validation of a rendered manifest list; raises on the first problem."""
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "ConfigMap" and kinds[1] in CRD_SCHEMAS and len(docs) == 2, kinds
    kubernetes_validate.validate(docs[0], K8S_VERSION, strict=True)
    job = docs[1]
    jsonschema.validate(job, json.loads((SCHEMAS / CRD_SCHEMAS[job["kind"]]).read_text()))
    for tmpl in pod_templates(job):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        env = tmpl["spec"]["containers"][0]["env"]
        secret_refs = [e["name"] for e in env if "valueFrom" in e]
        assert secret_refs and all("value" not in e for e in env if e["name"] in secret_refs)
        mounts = {m["mountPath"] for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
        assert "/etc/tessera" in mounts  # the ConfigMap with the resolved config


@pytest.mark.parametrize("name", ["train_pytorchjob.yaml", "ingest_rayjob.yaml"])
def test_golden_manifests_validate_strictly(name):
    docs = list(yaml.safe_load_all((GOLDEN / name).read_text()))
    validate(docs)
    if docs[1]["kind"] == "PyTorchJob":
        spec = docs[1]["spec"]
        assert {r["restartPolicy"] for r in spec["pytorchReplicaSpecs"].values()} == {"ExitCode"}
        assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1 and spec["nprocPerNode"] == "4"
    else:
        rc = docs[1]["spec"]["rayClusterSpec"]
        assert rc["authOptions"] == {"mode": "token"} and rc["workerGroupSpecs"][0]["replicas"] == 2


def test_the_validation_rejects_what_the_operators_would():
    docs = list(yaml.safe_load_all((GOLDEN / "train_pytorchjob.yaml").read_text()))
    bad = json.loads(json.dumps(docs))
    bad[1]["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "OnExitCode"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = json.loads(json.dumps(docs))
    bad[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["envv"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    rayjob = list(yaml.safe_load_all((GOLDEN / "ingest_rayjob.yaml").read_text()))
    rayjob[1]["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "none"
    with pytest.raises(jsonschema.ValidationError):
        validate(rayjob)


def _wrapper(cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["/bin/sh", "-c", _WRAPPER.format(cmd=cmd)], stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("code,expected", [(0, 0), (1, 1), (2, 2), (75, 143), (3, 3), (137, 137)])
def test_the_container_shell_maps_preemption_to_a_retryable_exit_code(code, expected):
    """PyTorchJob's ExitCode policy restarts only codes >= 128: 75 becomes 143; 1 and 2 stay permanent."""
    assert _wrapper(f"sh -c 'exit {code}'").wait(30) == expected


def test_sigterm_reaches_the_stage_and_counts_as_preemption(tmp_path):
    marker = tmp_path / "got-term"
    stage = f"sh -c 'trap \"touch {marker}; exit 3\" TERM; while :; do sleep 0.1; done'"
    proc = _wrapper(stage)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143 and marker.exists()


def test_submit_writes_valid_manifests_without_secrets_and_records_them(tmp_path):
    state = tmp_path / "jobs"
    env = dict(os.environ, **CANARIES)
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("sources: [{kind: emoji, limit: 4}]\noutput: /data/emoji\nexecutor: ray\n")
    job = submit("data", "ingest", "--config", str(cfg), "--backend", "k8s", "--nodes", "2",
                 *cluster_overrides(state, **{"k8s.image": "registry.example.com/tessera:1", "k8s.apply": "never"}),
                 env=env)
    rec = json.loads((state / job / "record.json").read_text())
    assert rec["state"] == "WRITTEN" and rec["backend_id"].startswith("rayjob/tessera-data-ingest-")
    text = (state / job / "manifests.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    validate(docs)
    assert "ray.address=auto" in docs[1]["spec"]["entrypoint"]  # the stage joins the RayJob's cluster
    assert yaml.safe_load(docs[0]["data"]["config.yaml"])["output"] == "/data/emoji"
    for name, value in CANARIES.items():
        for path in (state / job).rglob("*"):
            assert not path.is_file() or value not in path.read_text(), f"{name} leaked into {path}"
    status = subprocess.run([os.sys.executable, "-m", "tessera.cli", "jobs", "status", "--state-dir", str(state), job],
                            capture_output=True, text=True, cwd=ROOT)
    assert "WRITTEN" in status.stdout and "kubectl apply -f" in status.stdout
