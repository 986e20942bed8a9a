"""The backend interface (render, submit, refresh/status, logs, cancel) and its registry.

``list`` is the job store's: records are written by the submitter, so ``tessera jobs ls`` needs no scheduler
accounting. A backend turns a ``JobSpec`` into artefacts (an sbatch script, a Ray job request, manifests), hands
them to its scheduler, and later refreshes the record's state and attempts from the scheduler and the job.
"""

from __future__ import annotations

import abc
from typing import TextIO

from tessera.cluster.records import JobRecord, JobStore
from tessera.cluster.spec import JobSpec
from tessera.registry import Registry


class BackendError(RuntimeError):
    """The scheduler refused or failed a request (CLI exit code 1; the message carries its output)."""


class Backend(abc.ABC):
    """One scheduler."""

    name = ""

    @abc.abstractmethod
    def render(self, spec: JobSpec) -> dict[str, str]:
        """The artefacts to submit, file name -> text; ``--dry-run`` prints exactly these."""

    @abc.abstractmethod
    def submit(self, spec: JobSpec, record: JobRecord, store: JobStore) -> None:
        """Hand the rendered artefacts (already written to the job directory) to the scheduler; set
        ``record.backend_id`` and the first attempt."""

    @abc.abstractmethod
    def refresh(self, record: JobRecord, store: JobStore) -> None:
        """Update ``record.state``, ``reason`` and ``attempts`` from the scheduler (and resubmit where the
        backend's retries are the submitter's)."""

    @abc.abstractmethod
    def logs(self, record: JobRecord, store: JobStore, attempt: int | None, follow: bool, out: TextIO) -> None:
        """Write attempt ``attempt``'s log (default: the latest) to ``out``; ``follow`` until the job ends."""

    @abc.abstractmethod
    def cancel(self, record: JobRecord, store: JobStore) -> None:
        """Stop the job for good (no requeue, no resubmission)."""


BACKENDS: Registry[type[Backend]] = Registry("cluster backend")


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name``."""
    # Imported here: the backends import the job store and spec, which import this module.
    from tessera.cluster.k8s import K8sBackend
    from tessera.cluster.ray_jobs import RayJobsBackend
    from tessera.cluster.slurm import SlurmBackend

    for cls in (SlurmBackend, RayJobsBackend, K8sBackend):
        BACKENDS.register(cls.name)(cls)  # idempotent for the same class
    return BACKENDS.get(name)()
