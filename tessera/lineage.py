"""Where a job's inputs come from, for W&B's lineage graph: dataset -> training run -> checkpoint -> eval.

Datasets, checkpoints and exports become W&B artifacts *by reference* (``add_reference(uri, checksum=False)``):
W&B records the URI, never uploads or hashes the files, so a 10 TB dataset or a 40 GB checkpoint costs one
manifest line. The digest of such an artifact is a function of its URI alone, so the training run that writes a
checkpoint and the eval run that reads it name the same artifact version without talking to each other: both
derive it from the URI and the producing run's W&B id, which a run directory keeps in ``run.json``.

This module only reads files and builds names; ``tessera.tracking.Tracker`` talks to W&B.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tessera import storage

RUN_META = "run.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ArtifactRef:
    """One W&B artifact by reference: its name, type, the URI it points to and what W&B shows about it."""

    name: str
    type: str  # "dataset" | "model"
    uri: str  # s3://... or file:///abs/path
    metadata: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


def slug(text: str, limit: int = 40) -> str:
    """``text`` as W&B accepts it in run ids and artifact names (letters, digits, ``_ . -``), at most ``limit``."""
    return _UNSAFE.sub("-", text).strip("-.")[:limit] or "run"


def uri_of(url: str) -> str:
    """An absolute URI for a local path or an s3:// url (a relative path means nothing to another machine)."""
    if storage.scheme(url) != "file":
        return str(url).rstrip("/")
    return Path(storage.local_path(url)).resolve().as_uri()


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def read_run_meta(run_url: str) -> dict | None:
    """The ``run.json`` of a run directory, or None when there is none."""
    meta_url = storage.join(run_url, RUN_META)
    try:
        if not storage.exists(meta_url):
            return None
        meta = json.loads(storage.read_text(meta_url))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def producing_run(url: str) -> tuple[str, dict] | None:
    """(run dir, run.json) of the run that wrote a checkpoint, run dir or export, or None when unknown.

    A checkpoint lies at ``<run>/checkpoints/<step>`` (the trainer's default root), so the run directory is found
    by looking at the url and its two parents; an export names its source checkpoint in ``tessera.json``."""
    url = str(url).rstrip("/")
    export_meta = storage.join(url, "tessera.json")
    try:
        if storage.exists(export_meta):
            source = json.loads(storage.read_text(export_meta)).get("source_checkpoint")
            return producing_run(source) if source and source.rstrip("/") != url else None
    except (OSError, ValueError):
        return None
    candidate = url
    for _ in range(3):
        meta = read_run_meta(candidate)
        if meta is not None and meta.get("wandb_id"):
            return candidate, meta
        parent = candidate.rsplit("/", 1)[0] if "/" in candidate.replace("://", "") else candidate
        if parent == candidate:
            break
        candidate = parent
    return None


def checkpoint_artifact(url: str, wandb_id: str | None, *, step: int | None = None,
                        samples: int | None = None) -> ArtifactRef:
    """A training checkpoint: versions of ``model-<W&B id of the run that wrote it>``, one per step."""
    uri = uri_of(url)
    name = f"model-{wandb_id}" if wandb_id else f"model-{slug(os.path.basename(uri.rstrip('/')), 24)}-" \
                                                f"{_short_hash(uri)}"
    meta = {"uri": uri, "kind": "checkpoint"}
    meta.update({k: v for k, v in (("step", step), ("samples", samples)) if v is not None})
    return ArtifactRef(name=name, type="model", uri=uri, metadata=meta,
                       aliases=(f"step-{step}",) if step is not None else ())


def export_artifact(url: str, *, source: str | None = None, step: int | None = None) -> ArtifactRef:
    """An export dir (``tessera export``): ``export-<dir name>-<hash of its URI>``."""
    uri = uri_of(url)
    meta = {"uri": uri, "kind": "export", **({"source_checkpoint": source} if source else {}),
            **({"step": step} if step is not None else {})}
    return ArtifactRef(name=f"export-{slug(os.path.basename(uri.rstrip('/')), 24)}-{_short_hash(uri)}",
                       type="model", uri=uri, metadata=meta)


def dataset_artifact(url: str) -> ArtifactRef:
    """A dataset dir written by ``tessera data ingest``: ``dataset-<dir name>-<hash of its URI>``; the manifest's
    sample and shard counts go into the metadata when it can be read."""
    uri = uri_of(url)
    meta: dict = {"uri": uri}
    try:
        manifest = json.loads(storage.read_text(storage.join(url, "manifest.json")))
        meta.update(created=manifest.get("created"), shards=len(manifest.get("shards", [])),
                    samples=(manifest.get("totals") or {}).get("written"),
                    source=(manifest.get("lineage") or {}).get("source"))
    except (OSError, ValueError):
        pass  # a dataset still being written, or an older layout: the reference alone still gives lineage
    return ArtifactRef(name=f"dataset-{slug(os.path.basename(uri.rstrip('/')), 24)}-{_short_hash(uri)}",
                       type="dataset", uri=uri, metadata=meta)


def model_input(url: str) -> ArtifactRef:
    """The artifact a checkpoint, run dir or export is known by, as its consumer (eval, fine-tuning) names it."""
    url = str(url).rstrip("/")
    if storage.exists(storage.join(url, "tessera.json")):
        try:
            meta = json.loads(storage.read_text(storage.join(url, "tessera.json")))
        except (OSError, ValueError):
            meta = {}
        return export_artifact(url, source=meta.get("source_checkpoint"), step=meta.get("step"))
    found = producing_run(url)
    return checkpoint_artifact(url, found[1]["wandb_id"] if found else None)
