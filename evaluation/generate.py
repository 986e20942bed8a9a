"""Batched, resumable image generation for evaluation suites, locally or over Ray actors.

* An image is a pure function of (weights, sampling settings, prompt, per-image seed). The seed is
  ``image_seed(suite_seed, prompt_idx, sample_idx)``, and its noise (x_T and every stochastic sampler
  step) comes from that image's own generator, so batch size and actor layout never change an image.
* Output folder (local or ``s3://``)::

      <dir>/generation.json      what the images depend on (written first)
      <dir>/prompts.jsonl        {"idx", "prompt"} per prompt
      <dir>/images/PPPPP_SSS.png one file per (prompt, sample), written atomically
      <dir>/manifest.json        every item with its seed and sha256 (written last: the done-marker)

  A rerun lists ``images/`` and generates only what is missing; an atomic write means a listed image
  is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

from PIL import Image

from tessera import storage

log = logging.getLogger("tessera.eval.generate")

Item = tuple[int, int]  # (prompt_idx, sample_idx)


class ImageGenerator(Protocol):
    """Anything that turns prompts with per-image seeds into images (one per prompt, in order)."""

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]: ...


def image_seed(suite_seed: int, prompt_idx: int, sample_idx: int) -> int:
    """Per-image seed: a 63-bit hash of (suite seed, prompt index, sample index)."""
    digest = hashlib.sha256(f"tessera-eval:{suite_seed}:{prompt_idx}:{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def work_items(n_prompts: int, images_per_prompt: int) -> list[Item]:
    """Every (prompt_idx, sample_idx) of a suite, prompt-major."""
    return [(p, s) for p in range(n_prompts) for s in range(images_per_prompt)]


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive chunks of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def png_bytes(img: Image.Image) -> bytes:
    """Lossless PNG encoding (metrics must see exactly the generated pixels)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


class ImageFolder:
    """The on-storage layout of one checkpoint's generated images (see module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")

    def image_url(self, item: Item) -> str:
        """Where the image of ``item`` lives."""
        return storage.join(self.url, "images", f"{item[0]:05d}_{item[1]:03d}.png")

    def existing(self) -> set[Item]:
        """Items whose image file is already written."""
        prefix = storage.join(self.url, "images") + "/"
        if not storage.is_s3(self.url) and not storage.local_path(prefix).is_dir():
            return set()
        out = set()
        for u in storage.list_prefix(prefix):
            name = u.rsplit("/", 1)[-1]
            stem, _, ext = name.partition(".")
            if ext == "png" and "_" in stem:
                p, s = stem.split("_", 1)
                if p.isdigit() and s.isdigit():
                    out.add((int(p), int(s)))
        return out

    def write_image(self, item: Item, img: Image.Image) -> str:
        """Write one image atomically; returns its sha256."""
        data = png_bytes(img)
        storage.write_bytes(self.image_url(item), data)
        return hashlib.sha256(data).hexdigest()

    def read_image(self, item: Item) -> Image.Image:
        """Decode one stored image (fully loaded)."""
        img = Image.open(io.BytesIO(storage.read_bytes(self.image_url(item))))
        img.load()
        return img

    def write_json(self, name: str, obj: Any) -> None:
        """A small JSON file in the folder, atomically."""
        storage.write_text(storage.join(self.url, name), json.dumps(obj, indent=1, sort_keys=True, default=str))

    def read_json(self, name: str) -> Any | None:
        """A JSON file of the folder, or None when absent."""
        u = storage.join(self.url, name)
        return json.loads(storage.read_text(u)) if storage.exists(u) else None

    def write_prompts(self, prompts: list[str]) -> None:
        """``prompts.jsonl``: the prompt of every index."""
        text = "".join(json.dumps({"idx": i, "prompt": p}, ensure_ascii=False) + "\n" for i, p in enumerate(prompts))
        storage.write_text(storage.join(self.url, "prompts.jsonl"), text)


# --------------------------------------------------------------------------- one batch


def run_batch(gen: ImageGenerator, folder: ImageFolder, prompts: list[str], batch: list[Item],
              suite_seed: int) -> list[tuple[int, int, str]]:
    """Generate and store one batch; returns (prompt_idx, sample_idx, sha256) per image."""
    seeds = [image_seed(suite_seed, p, s) for p, s in batch]
    extra = {"prompt_idx": [p for p, _ in batch]} if getattr(gen, "takes_prompt_idx", False) else {}
    images = gen([prompts[p] for p, _ in batch], seeds, **extra)
    if len(images) != len(batch):
        raise RuntimeError(f"generator returned {len(images)} images for a batch of {len(batch)}")
    return [(p, s, folder.write_image((p, s), img)) for (p, s), img in zip(batch, images)]


class _GenActor:
    """A Ray actor holding one generator (one per device) that writes its images straight to storage."""

    def __init__(self, factory: Callable[[], ImageGenerator], folder_url: str, prompts: list[str],
                 suite_seed: int) -> None:
        self.gen = factory()
        self.folder, self.prompts, self.seed = ImageFolder(folder_url), prompts, suite_seed

    def run(self, batch: list[Item]) -> list[tuple[int, int, str]]:
        """Generate and store one batch."""
        return run_batch(self.gen, self.folder, self.prompts, batch, self.seed)


@dataclass(kw_only=True)
class DistributeConfig:
    """Where generation runs: in this process, or on Ray actors (one per device)."""

    backend: Literal["local", "ray"] = "local"
    num_actors: int = 0  # 0: one per GPU in the cluster, or 1 on a CPU-only cluster
    address: str | None = None  # None: start an embedded Ray runtime; "auto" or ray://...: join a cluster
    num_cpus: int | None = None  # embedded runtime only; None = all cores
    object_store_mb: int = 200  # embedded runtime only (Ray's default reserves 30% of RAM)
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_actors < 0:
            raise ValueError(f"num_actors must be >= 0, got {self.num_actors}")


def _ray_actors(cfg: DistributeConfig, factory, folder: ImageFolder, prompts: list[str], seed: int):
    """Start Ray if needed and create the generation actors (GPU each when the cluster has GPUs)."""
    import ray

    from tessera.ray_runtime import RayConfig, ensure_ray

    ensure_ray(RayConfig(address=cfg.address, num_cpus=cfg.num_cpus, object_store_memory_mb=cfg.object_store_mb))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = cfg.num_actors or max(gpus, 1)
    actor_cls = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=1 if gpus else 0)(_GenActor)
    return [actor_cls.remote(factory, folder.url, prompts, seed) for _ in range(n)]


def generate_missing(folder: ImageFolder, prompts: list[str], images_per_prompt: int, suite_seed: int,
                     factory: Callable[[], ImageGenerator], *, batch_size: int,
                     distribute: DistributeConfig | None = None, identity: dict | None = None) -> dict:
    """Generate every image of the suite not yet in ``folder``; returns counts, timing and the manifest."""
    distribute = distribute or DistributeConfig()
    items = work_items(len(prompts), images_per_prompt)
    have = folder.existing()
    todo = [it for it in items if it not in have]
    if identity is not None:
        prev = folder.read_json("generation.json")
        if prev is not None and prev != json.loads(json.dumps(identity, sort_keys=True, default=str)):
            raise ValueError(f"{folder.url}/generation.json describes different settings; use another output dir")
        if prev is None:
            folder.write_json("generation.json", identity)
    folder.write_prompts(prompts)
    t0 = time.perf_counter()
    done: list[tuple[int, int, str]] = []
    if todo:
        log.info("generating %d of %d images (%d reused) in %s", len(todo), len(items), len(items) - len(todo),
                 folder.url)
        work = batches(todo, batch_size)
        if distribute.backend == "ray":
            from ray.util import ActorPool

            pool = ActorPool(_ray_actors(distribute, factory, folder, prompts, suite_seed))
            for res in pool.map_unordered(lambda a, b: a.run.remote(b), work):
                done.extend(res)
        else:
            gen = factory()
            for b in work:
                done.extend(run_batch(gen, folder, prompts, b, suite_seed))
    seconds = time.perf_counter() - t0
    manifest = _manifest(folder, items, done, suite_seed)
    folder.write_json("manifest.json", manifest)
    return {"total": len(items), "generated": len(todo), "reused": len(items) - len(todo),
            "seconds": round(seconds, 3), "images_per_s": round(len(todo) / seconds, 3) if todo else None,
            "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()}


def _manifest(folder: ImageFolder, items: list[Item], done: list[tuple[int, int, str]], seed: int) -> dict:
    """Every item with seed and sha256; hashes of reused images come from the previous manifest or the file."""
    prev = {(r["prompt_idx"], r["sample_idx"]): r["sha256"] for r in (folder.read_json("manifest.json") or {}).get("items", [])}
    new = {(p, s): h for p, s, h in done}
    rows = []
    for it in items:
        sha = new.get(it) or prev.get(it)
        if sha is None:
            sha = hashlib.sha256(storage.read_bytes(folder.image_url(it))).hexdigest()
        rows.append({"prompt_idx": it[0], "sample_idx": it[1], "seed": image_seed(seed, *it), "sha256": sha,
                     "file": f"images/{it[0]:05d}_{it[1]:03d}.png"})
    return {"format": "tessera-eval-images/1", "n": len(rows), "items": rows}


# --------------------------------------------------------------------------- a model as an ImageGenerator


@dataclass(kw_only=True)
class SamplingSpec:
    """Resolved settings every image depends on (besides weights, prompt and seed)."""

    sampler: dict  # a trainer SamplerConfig as a mapping
    height: int
    width: int
    precision: Literal["fp32", "bf16", "fp16"]


class ModelGenerator:
    """Per-image-seeded, batched sampling from an in-memory model (``trainer.inference.sample_seeded``); a control
    model takes ``controls`` (PNG bytes of each prompt's condition, by prompt index) at ``control_scale``."""

    takes_prompt_idx = True  # run_batch passes each image's prompt index (its condition)

    def __init__(self, model, text_encoder, autoencoder, objective_cfg, spec: SamplingSpec, device=None,
                 controls: list[bytes] | None = None, control_scale: float | None = None) -> None:
        import torch

        self.model, self.te, self.ae, self.obj_cfg, self.spec = model, text_encoder, autoencoder, objective_cfg, spec
        self.device = device or next(model.parameters()).device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.precision]
        self.controls, self.control_scale = controls, control_scale

    def __call__(self, prompts: list[str], seeds: list[int], prompt_idx: list[int] | None = None) -> list[Image.Image]:
        from tessera.config import from_dict
        from tessera.trainer.diffusion.sampling import SamplerConfig
        from tessera.trainer.inference import from_pil, sample_seeded

        smp = from_dict(SamplerConfig, self.spec.sampler, "sampling spec")
        control = None
        if self.controls is not None:
            size = (self.spec.width, self.spec.height)
            control = from_pil([Image.open(io.BytesIO(self.controls[p])).convert("RGB").resize(size, Image.NEAREST)
                                for p in prompt_idx])  # (B, 3, H, W) in [-1, 1]
        return sample_seeded(self.model, self.te, self.ae, smp, self.obj_cfg, prompts, seeds,
                             height=self.spec.height, width=self.spec.width, device=self.device, dtype=self.dtype,
                             control=control, control_scale=self.control_scale)


class CheckpointFactory:
    """Picklable recipe (sent to Ray actors) that loads a checkpoint and returns a ``ModelGenerator``."""

    def __init__(self, checkpoint: str, spec: SamplingSpec, use_ema: bool = True, device: str = "auto",
                 controls: list[bytes] | None = None, control_scale: float | None = None) -> None:
        self.checkpoint, self.spec, self.use_ema, self.device = checkpoint, spec, use_ema, device
        self.controls, self.control_scale = controls, control_scale

    def __call__(self) -> ModelGenerator:
        from tessera.device import pick_device
        from tessera.trainer.inference import load_for_sampling

        device = pick_device(self.device)
        model, te, ae, obj_cfg, _, _ = load_for_sampling(self.checkpoint, use_ema=self.use_ema, device=device)
        return ModelGenerator(model, te, ae, obj_cfg, self.spec, device, self.controls, self.control_scale)
