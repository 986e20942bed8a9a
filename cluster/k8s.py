"""Kubernetes: manifests written to the job directory, applied only when ``kubectl`` is there.

Training becomes a Kubeflow ``PyTorchJob`` (kubeflow.org/v1); data and eval stages a KubeRay ``RayJob``
(ray.io/v1) whose cluster keeps Ray's token authentication on. The resolved config travels in a ConfigMap;
secrets only as ``secretKeyRef`` to the Secret ``cluster.k8s.secret_name``. Every pod asks for the CPUs of all its
ranks, gets a memory-backed ``/dev/shm``, the termination grace period ``k8s.grace_period_s`` and, optionally,
RDMA/EFA devices with ``IPC_LOCK``; the image is the repository's ``Dockerfile``.

PyTorchJob's ``ExitCode`` restart policy restarts a replica only for exit codes >= 128 and treats 1-127 as
permanent, so the container's shell maps the preemption code 75 (and any exit after a forwarded SIGTERM) to
143: the operator then restarts it, within ``runPolicy.backoffLimit``, and it resumes from its checkpoint;
1 and 2 (user or config errors) stay permanent.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import TextIO

import yaml

from tessera.cluster.backend import Backend, BackendError
from tessera.cluster.records import JobRecord, JobStore
from tessera.cluster.spec import CONFIG_NAME, JobSpec
from tessera.config import ConfigError

MANIFESTS = "manifests.yaml"
CONFIG_MOUNT = "/etc/tessera"
DEFAULT_WORKDIR = "/workspace"
_LABEL = "tessera.io/job"
_PTJ_LABEL = "training.kubeflow.org/job-name"
# The container shell: run the stage in the background so SIGTERM (preemption, eviction) reaches it at once. After
# a SIGTERM any failure counts as a preemption (143, retried): torchrun (several ranks per pod) exits 1, not the
# ranks' 75, when its ranks checkpoint and exit.
_WRAPPER = """{cmd} &
child=$!
signaled=0
trap 'signaled=1; kill -TERM "$child" 2>/dev/null' TERM
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
code=$?
if [ "$code" = 0 ]; then exit 0; fi
if [ "$code" = 75 ] || [ "$signaled" = 1 ]; then exit 143; fi
exit "$code"
"""


def k8s_name(text: str) -> str:
    """A DNS-1123 label: lowercase letters, digits and '-', at most 47 characters (KubeRay's RayJob limit)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:47].rstrip("-")


def _env(spec: JobSpec) -> list[dict]:
    c, r = spec.cluster, spec.cluster.resources
    plain = {"PYTHONUNBUFFERED": "1", "TESSERA_NO_PROGRESS": "1", "TESSERA_JOB_ID": spec.id}
    if r.cpus_per_task:
        plain["OMP_NUM_THREADS"] = str(r.cpus_per_task)
    if spec.distributed:
        plain.update(c.distributed.environment())
        # torchrun's agent (several ranks per pod) SIGKILLs its ranks this long after a SIGTERM: let a rank finish
        # its step and checkpoint within the pod's grace period (torch releases since early 2026 read it; older: 30 s).
        plain["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(c.k8s.grace_period_s)
    plain.update(c.env)
    env = [{"name": k, "value": v} for k, v in plain.items()]
    # By name only: the value stays in the cluster's Secret; optional, so a job without W&B still starts.
    return env + [{"name": s, "valueFrom": {"secretKeyRef": {"name": c.k8s.secret_name, "key": s, "optional": True}}}
                  for s in c.secrets]


def _resources(spec: JobSpec, ranks: int) -> dict:
    """One pod's requests and limits: the CPUs of all its ranks, the node's memory, GPUs, RDMA/EFA devices."""
    r, k = spec.cluster.resources, spec.cluster.k8s
    res = {"cpu": str(r.cpus_per_task * ranks if r.cpus_per_task else k.cpus_per_node),
           "memory": f"{r.mem_gb or k.memory_gb_per_node}Gi"}
    if r.gpus_per_node:
        res["nvidia.com/gpu"] = str(r.gpus_per_node)
    res.update({name: str(n) for name, n in k.rdma_resources.items()})
    return {"requests": dict(res), "limits": dict(res)}


def pod_template(spec: JobSpec, container: str, command: list[str] | None, labels: dict, ranks: int = 1) -> dict:
    """A pod template: the image, the config mount, a memory-backed /dev/shm, env with secret references,
    resources for ``ranks`` ranks, the termination grace period."""
    c = spec.cluster
    workdir = c.workdir or DEFAULT_WORKDIR
    mounts = [{"name": "tessera-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "tessera-config", "configMap": {"name": f"{k8s_name(spec.name)}-config"}},
               # DataLoader workers pass batches through /dev/shm; the container default (64 MB) kills them with a
               # bus error. Memory-backed: it counts against the pod's memory limit.
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{c.k8s.shm_gb}Gi"}}]
    if c.k8s.volume_claim:
        mounts.append({"name": "work", "mountPath": workdir})
        volumes.append({"name": "work", "persistentVolumeClaim": {"claimName": c.k8s.volume_claim}})
    ctr = {"name": container, "image": c.k8s.image, **({"command": command} if command else {}),
           "workingDir": workdir, "env": _env(spec), "resources": _resources(spec, ranks), "volumeMounts": mounts}
    if c.k8s.rdma_resources:  # RDMA registers (pins) its buffers: the container needs to lock memory
        ctr["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    pod = {"terminationGracePeriodSeconds": c.k8s.grace_period_s, "containers": [ctr], "volumes": volumes}
    if c.k8s.service_account:
        pod["serviceAccountName"] = c.k8s.service_account
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def _deadline(spec: JobSpec) -> dict:
    """``activeDeadlineSeconds`` from ``resources.time``."""
    seconds = spec.cluster.resources.seconds
    return {"activeDeadlineSeconds": seconds} if seconds else {}


def pytorchjob(spec: JobSpec, labels: dict) -> dict:
    """A Kubeflow PyTorchJob: a Master and ``nodes - 1`` Workers, one pod per node."""
    c, r = spec.cluster, spec.cluster.resources
    cmd = spec.command("python", f"{CONFIG_MOUNT}/{CONFIG_NAME}")
    if r.ranks_per_node > 1:  # torchrun reads the PET_* rendezvous variables the operator sets
        cmd = ["python", "-m", "torch.distributed.run", "-m", *cmd[2:]]
    shell = ["/bin/sh", "-c", _WRAPPER.format(cmd=" ".join(shlex.quote(a) for a in cmd))]
    replica = {"replicas": 1, "restartPolicy": "ExitCode",
               "template": pod_template(spec, "pytorch", shell, labels, ranks=r.ranks_per_node)}
    replicas = {"Master": replica}
    if r.nodes > 1:
        replicas["Worker"] = dict(replica, replicas=r.nodes - 1)
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
           "metadata": {"name": k8s_name(spec.name), "namespace": c.k8s.namespace, "labels": dict(labels)},
           "spec": {"runPolicy": {"backoffLimit": c.retry.preemptions + c.retry.crashes, **_deadline(spec)},
                    "pytorchReplicaSpecs": replicas}}
    if r.ranks_per_node > 1:
        job["spec"]["nprocPerNode"] = str(r.ranks_per_node)
    return job


def rayjob(spec: JobSpec, labels: dict) -> dict:
    """A KubeRay RayJob: a Ray cluster (head + ``nodes - 1`` workers) that runs the stage and is deleted after."""
    c, r = spec.cluster, spec.cluster.resources
    try:
        ray_version = c.k8s.ray_version or version("ray")
    except PackageNotFoundError:
        raise ConfigError("cluster.k8s.ray_version is required when Ray is not installed here") from None
    cluster = {"rayVersion": ray_version, "authOptions": {"mode": "token"},
               "headGroupSpec": {"rayStartParams": {}, "template": pod_template(spec, "ray-head", None, labels)}}
    if r.nodes > 1:
        n = r.nodes - 1
        cluster["workerGroupSpecs"] = [{"groupName": "workers", "replicas": n, "minReplicas": n, "maxReplicas": n,
                                        "rayStartParams": {},
                                        "template": pod_template(spec, "ray-worker", None, labels)}]
    cmd = " ".join(shlex.quote(a) for a in spec.command("python", f"{CONFIG_MOUNT}/{CONFIG_NAME}"))
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": k8s_name(spec.name), "namespace": c.k8s.namespace, "labels": dict(labels)},
            "spec": {"entrypoint": cmd, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                     "backoffLimit": c.retry.crashes, "metadata": {"tessera_job": spec.id},
                     "rayClusterSpec": cluster, **_deadline(spec)}}


def manifests(spec: JobSpec) -> list[dict]:
    """The ConfigMap with the resolved config, then the job."""
    c = spec.cluster
    if not c.k8s.image:
        raise ConfigError("cluster.k8s.image is required for the k8s backend: an image with tessera installed, built "
                          "from the repository's Dockerfile (docker build -t <registry>/tessera:<version> . and push "
                          "it), then cluster.k8s.image=<registry>/tessera:<version>")
    labels = {"app.kubernetes.io/name": "tessera", _LABEL: k8s_name(spec.id)}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{k8s_name(spec.name)}-config", "namespace": c.k8s.namespace,
                               "labels": dict(labels)},
                  "data": {CONFIG_NAME: spec.config_text}}
    return [config_map, pytorchjob(spec, labels) if spec.distributed else rayjob(spec, labels)]


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people and kubectl: no anchors for repeated pod templates, multi-line strings as blocks."""

    def ignore_aliases(self, data) -> bool:
        """Never emit anchors and aliases."""
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                              style="|" if "\n" in s else None))


class K8sBackend(Backend):
    """``kubectl`` when present; otherwise the manifests are the product."""

    name = "k8s"

    def render(self, spec: JobSpec) -> dict[str, str]:
        """``{"manifests.yaml": ...}``."""
        if spec.array or spec.after:
            raise ConfigError("--array and --after are Slurm options")
        return {MANIFESTS: yaml.dump_all(manifests(spec), Dumper=_Dumper, sort_keys=False, default_flow_style=False)}

    def submit(self, spec: JobSpec, record: JobRecord, store: JobStore) -> None:
        """``kubectl apply`` when ``cluster.k8s.apply`` allows it and kubectl is on PATH; else only written."""
        mode, kubectl = spec.cluster.k8s.apply, shutil.which("kubectl")
        record.endpoint = spec.cluster.k8s.namespace
        record.backend_id = f"{self._kind(record).lower()}/{k8s_name(spec.name)}"
        if mode == "never" or (mode == "auto" and not kubectl):
            record.state = "WRITTEN"
            record.reason = f"apply with: kubectl apply -f {spec.job_dir / MANIFESTS}"
            return
        try:
            _kubectl(["apply", "-f", str(spec.job_dir / MANIFESTS)])
        except BackendError as e:
            raise BackendError(f"{e}\n(the manifests are in {spec.job_dir / MANIFESTS}; cluster.k8s.apply=never "
                               "only writes them)") from None
        record.state = "SUBMITTED"

    @staticmethod
    def _kind(record: JobRecord) -> str:
        return "PyTorchJob" if record.stage.split()[0] in ("train", "finetune", "distill") else "RayJob"

    def refresh(self, record: JobRecord, store: JobStore) -> None:
        """The job's status conditions (PyTorchJob) or deployment status (RayJob)."""
        if record.state == "WRITTEN":
            return
        obj = json.loads(_kubectl(["get", "-n", record.endpoint, record.backend_id, "-o", "json"]))
        status = obj.get("status", {})
        if self._kind(record) == "RayJob":
            js = status.get("jobStatus") or status.get("jobDeploymentStatus") or "PENDING"
            record.state = {"SUCCEEDED": "COMPLETED", "FAILED": "FAILED", "STOPPED": "CANCELLED",
                            "RUNNING": "RUNNING"}.get(js, "PENDING")
        else:
            conds = [c["type"] for c in status.get("conditions", []) if c.get("status") == "True"]
            last = conds[-1] if conds else "Created"
            record.state = {"Succeeded": "COMPLETED", "Failed": "FAILED", "Running": "RUNNING",
                            "Restarting": "PENDING"}.get(last, "PENDING")
        store.save(record)

    def logs(self, record: JobRecord, store: JobStore, attempt: int | None, follow: bool, out: TextIO) -> None:
        """``kubectl logs`` of the master pod (PyTorchJob) or the submitter job (RayJob)."""
        if record.state == "WRITTEN":
            raise BackendError(f"job {record.id} was not applied ({record.reason})")
        name = record.backend_id.split("/", 1)[1]
        target = ["-l", f"{_PTJ_LABEL}={name}"] if self._kind(record) == "PyTorchJob" else [f"job/{name}"]
        out.write(_kubectl(["logs", "-n", record.endpoint, *target, *(["-f"] if follow else [])], timeout=None))

    def cancel(self, record: JobRecord, store: JobStore) -> None:
        """``kubectl delete`` the job (its pods go with it)."""
        record.cancelled = True
        if record.state != "WRITTEN":
            _kubectl(["delete", "-n", record.endpoint, record.backend_id])
        record.state = "CANCELLED"
        store.save(record)


def _kubectl(args: list[str], timeout: float | None = 120) -> str:
    try:
        out = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BackendError("kubectl not found") from None
    if out.returncode != 0:
        raise BackendError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout
