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
    cfg.write_text("sources: [{name: emoji, limit: 4}]\noutput: /data/emoji\nexecutor: ray\n")
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


# A stand-in for kubectl on PATH (no API server here): it records each call and answers `get -o json` with the
# status the test writes, so what Tessera sends to kubectl and how it reads the answer are both checked.
KUBECTL = r'''#!{python}
import json, os, shutil, sys
root = os.environ["FAKE_KUBECTL_DIR"]
args = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
if os.path.exists(os.path.join(root, "fail")):
    sys.stderr.write("error: the server doesn't have a resource type \"pytorchjobs\"\n")
    sys.exit(1)
if args[0] == "apply":
    shutil.copy(args[args.index("-f") + 1], os.path.join(root, "applied.yaml"))
    print("configmap/x created")
elif args[0] == "get":
    print(open(os.path.join(root, "status.json")).read())
elif args[0] == "logs":
    print("rank 0: step 1 loss 0.5")
'''


def _fake_kubectl(tmp_path: Path) -> dict:
    bin_dir, root = tmp_path / "bin", tmp_path / "kubectl"
    bin_dir.mkdir()
    root.mkdir()
    exe = bin_dir / "kubectl"
    exe.write_text(KUBECTL.replace("{python}", os.sys.executable))
    exe.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_KUBECTL_DIR=str(root), **CANARIES)


def _calls(env: dict) -> list[list[str]]:
    return [json.loads(line) for line in (Path(env["FAKE_KUBECTL_DIR"]) / "calls.jsonl").read_text().splitlines()]


def test_with_kubectl_on_path_a_job_is_applied_followed_and_deleted(tmp_path):
    from tests.cluster.conftest import tessera

    state, env = tmp_path / "jobs", _fake_kubectl(tmp_path)
    status = Path(env["FAKE_KUBECTL_DIR"]) / "status.json"
    cl = cluster_overrides(state, **{"k8s.image": "registry.example.com/tessera:1", "k8s.namespace": "ml"})
    job = submit("train", "--config", str(ROOT / "configs/train/tiny_dit.yaml"), "--backend", "k8s", "--nodes", "2",
                 "--gpus-per-node", "1", *cl, env=env)
    rec = json.loads((state / job / "record.json").read_text())
    assert rec["state"] == "SUBMITTED" and rec["backend_id"].startswith("pytorchjob/")
    assert _calls(env) == [["apply", "-f", str(state / job / "manifests.yaml")]]
    applied = (Path(env["FAKE_KUBECTL_DIR"]) / "applied.yaml").read_text()
    validate(list(yaml.safe_load_all(applied)))  # what reached kubectl is the validated manifest, without secrets
    assert all(v not in applied for v in CANARIES.values())

    def state_with(status_doc: dict, job: str = job) -> str:
        status.write_text(json.dumps({"status": status_doc}))
        out = tessera("jobs", "status", "--state-dir", str(state), job, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads((state / job / "record.json").read_text())["state"]

    assert state_with({}) == "PENDING"
    assert state_with({"conditions": [{"type": "Created", "status": "True"},
                                      {"type": "Running", "status": "True"}]}) == "RUNNING"
    assert state_with({"conditions": [{"type": "Running", "status": "False"},
                                      {"type": "Restarting", "status": "True"}]}) == "PENDING"  # a retried pod
    name = rec["backend_id"].split("/", 1)[1]
    assert _calls(env)[1] == ["get", "-n", "ml", rec["backend_id"], "-o", "json"]

    logs = tessera("jobs", "logs", "--state-dir", str(state), job, env=env)
    assert logs.returncode == 0 and "rank 0: step 1 loss 0.5" in logs.stdout, logs.stderr
    assert _calls(env)[-1] == ["logs", "-n", "ml", "-l", f"training.kubeflow.org/job-name={name}"]
    out = tessera("jobs", "cancel", "--state-dir", str(state), job, "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"id": job, "backend_id": rec["backend_id"], "cancelled": True,
                                      "state": "CANCELLED"}
    assert ["delete", "-n", "ml", rec["backend_id"]] in _calls(env)[-2:]
    assert json.loads((state / job / "record.json").read_text())["state"] == "CANCELLED"
    again = submit("train", "--config", str(ROOT / "configs/train/tiny_dit.yaml"), "--backend", "k8s", *cl, env=env)
    assert state_with({"conditions": [{"type": "Running", "status": "False"},
                                      {"type": "Succeeded", "status": "True"}]}, again) == "COMPLETED"

    # A data stage is a RayJob, read from its job status.
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("sources: [{name: emoji, limit: 4}]\noutput: /data/emoji\nexecutor: ray\n")
    data = submit("data", "ingest", "--config", str(cfg), "--backend", "k8s", *cl, env=env)
    status.write_text(json.dumps({"status": {"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}}))
    assert tessera("jobs", "status", "--state-dir", str(state), data, env=env).returncode == 0
    assert json.loads((state / data / "record.json").read_text())["state"] == "COMPLETED"


def test_a_kubectl_refusal_is_one_error_naming_the_written_manifests(tmp_path):
    from tests.cluster.conftest import tessera

    state, env = tmp_path / "jobs", _fake_kubectl(tmp_path)
    (Path(env["FAKE_KUBECTL_DIR"]) / "fail").touch()
    out = tessera("submit", "train", "--config", str(ROOT / "configs/train/tiny_dit.yaml"), "--backend", "k8s",
                  *cluster_overrides(state, **{"k8s.image": "registry.example.com/tessera:1"}), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "doesn't have a resource type" in out.stderr and "manifests.yaml" in out.stderr
    assert "cluster.k8s.apply=never" in out.stderr


def test_after_sigterm_any_failure_is_a_preemption():
    """torchrun (several ranks per pod) exits 1, not its ranks' 75, once they checkpointed after a SIGTERM."""
    proc = _wrapper("sh -c 'trap \"exit 1\" TERM; while :; do sleep 0.1; done'")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143


def test_training_pods_get_shm_grace_all_ranks_cpus_and_rdma():
    from tests.cluster.test_golden import spec

    from tessera.cluster.k8s import manifests

    s = spec(["train"], "train-20261202-130000-abcdef",
             {"backend": "k8s", "resources": {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 12, "mem_gb": 900},
              "k8s": {"image": "registry.example.com/tessera:0.1.0", "grace_period_s": 900, "shm_gb": 128,
                      "rdma_resources": {"vpc.amazonaws.com/efa": 32}}})
    docs = manifests(s)
    validate(docs)
    for tmpl in pod_templates(docs[1]):
        pod, (ctr,) = tmpl["spec"], tmpl["spec"]["containers"]
        assert pod["terminationGracePeriodSeconds"] == 900
        assert ctr["resources"]["limits"] == {"cpu": "96", "memory": "900Gi", "nvidia.com/gpu": "8",
                                              "vpc.amazonaws.com/efa": "32"}  # 8 ranks x 12 CPUs
        assert ctr["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
        shm = next(v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
        assert shm["emptyDir"]["sizeLimit"] == "128Gi"
        assert {"name": shm["name"], "mountPath": "/dev/shm"} in ctr["volumeMounts"]
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "900" and env["OMP_NUM_THREADS"] == "12"
        assert env["TESSERA_DIST_TIMEOUT_S"] == "1800" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert docs[1]["spec"]["nprocPerNode"] == "8"
    plain = manifests(spec(["train"], "train-20261202-130001-abcdef",
                           {"backend": "k8s", "resources": {"gpus_per_node": 1}}))
    (ctr,) = pod_templates(plain[1])[0]["spec"]["containers"]
    assert "securityContext" not in ctr and ctr["resources"]["limits"]["cpu"] == "8"  # k8s.cpus_per_node
