"""What a suite knows about a checkpoint before loading it: its step, sample settings and weight sets.

Resolution and the file formats are the trainer's (``trainer.inference.resolve_checkpoint`` and
``job_config``, ``trainer.consolidate`` for a sharded checkpoint's weights); evaluation only reads them. The
weights are hashed so that a suite's generated images are keyed by the exact weights that made them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tessera import storage
from tessera.config import to_dict
from tessera.trainer import checkpoint as C
from tessera.trainer import consolidate
from tessera.trainer.inference import job_config, resolve_checkpoint, sampling_weights


@dataclass(kw_only=True)
class CheckpointInfo:
    """A resolved checkpoint or export: where it is, how far it trained, and how it samples by default."""

    given: str
    url: str
    kind: str  # "checkpoint" | "export"
    step: int
    samples: int
    sampler: dict  # the trainer SamplerConfig it was trained to sample with
    size: tuple[int, int]  # its training-time sample (height, width)
    weights: dict[str, str]  # weight set (a file relative to url, or "raw"/"ema" of a sharded checkpoint) -> url


def checkpoint_info(checkpoint: str) -> CheckpointInfo:
    """Resolve a checkpoint, run or export dir (local or s3://) and read its counters and sample settings."""
    kind, url = resolve_checkpoint(checkpoint)
    if kind == "export":
        meta = C.read_json(storage.join(url, "tessera.json"))
        files = [f"{v}/model.safetensors" for v in meta["variants"]]
        step, samples, sampler, size = meta.get("step", 0), meta.get("samples", 0), meta["sampler"], meta["sample_size"]
    else:
        cfg = job_config(url)
        state = C.read_json(storage.join(url, "trainer_state.json"))["trainer"]
        step, samples = state.get("step", 0), state.get("samples", 0)
        sampler, size = to_dict(cfg.samples.sampler), [cfg.samples.height, cfg.samples.width]
        files = list(consolidate.weight_sets(url).values())
    return CheckpointInfo(given=checkpoint, url=url, kind=kind, step=int(step), samples=int(samples),
                          sampler=dict(sampler), size=(int(size[0]), int(size[1])),
                          weights={f: storage.join(url, f) for f in files})


def weights_used(info: CheckpointInfo, use_ema: bool) -> str:
    """The weight file ``trainer.inference.load_for_sampling`` reads (images are keyed by its hash before any
    weights are loaded)."""
    return sampling_weights(info.kind, info.url, use_ema)


def weights_sha256(info: CheckpointInfo) -> dict[str, str]:
    """sha256 of each weight set: a file's bytes, or a sharded checkpoint's assembled tensors."""
    return {name: sha256_url(u) if name.endswith(".safetensors") else consolidate.weights_sha256(info.url, name)
            for name, u in info.weights.items()}


def sha256_url(url: str) -> str:
    """sha256 of a local or S3 object, streamed."""
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unique_labels(infos: list[CheckpointInfo]) -> list[str]:
    """Short, unique, filesystem-safe names: the dir name, prefixed by its parent when ambiguous."""
    def parts(u: str) -> list[str]:
        return [p for p in u.replace("s3://", "").split("/") if p]

    labels = [parts(i.url)[-1] for i in infos]
    for lab in list(labels):
        if labels.count(lab) > 1:
            labels = [("-".join(parts(x.url)[-2:]) if labels[j] == lab else labels[j]) for j, x in enumerate(infos)]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}-{seen[lab]}")
    return out
