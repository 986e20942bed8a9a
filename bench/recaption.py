"""Benchmark: the ``hf`` recaption path on Ray actors vs a plain transformers loop, images/s on the same images.

Both sides caption the same ingested emoji and openclipart PNGs (several aspect buckets) with the same small random
Qwen2-VL (built from a config and saved with ``save_pretrained``, loaded back through
``AutoModelForImageTextToText``), the same batch size and the same sampling, batched alike (by aspect bucket within
a shard). The plain loop is one process: read a shard, decode a batch, run the processor, ``generate``, decode the
text, next batch. Tessera is ``run_recaption`` with ``--actors`` Ray actors: each holds the model, takes whole
shards, and prepares the next batches (decode + processor) in a thread while ``generate`` runs. Filters keep every
non-empty caption (``reject: []``), so both sides generate the same number of captions. The plain loop's time
includes loading the model; Tessera's includes starting its actors and loading the model in each, but not Ray
itself (a cluster is already up when a job joins it): Ray's start-up is measured once and printed apart.

The comparison is with the plain loop as written (torch's default threads: one per core), end to end and at steady
state (the actors' summed shard throughput, without their fixed start-up of a few seconds: process, imports, model
load), which is what a job of realistic size approaches. ``--one-thread`` adds the plain loop on one torch thread,
its best setting on a busy machine (torch's intra-op threads on a small model's tiny matmuls contend badly with
other load; each actor runs one thread), which isolates what the actors themselves buy.
Runs alternate (plain, tessera, ...) through ``bench/harness.py``; the result goes to
``bench/results/recaption.json``.

    .venv/bin/python bench/recaption.py [--images 6000] [--actors 2] [--batch-size 8] [--repeats 3] [--one-thread]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402


def build_inputs(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The ingested emoji (and openclipart) dataset and the saved model directory."""
    from tessera.config import from_dict
    from tessera.data_pipeline.ingest import IngestConfig, run_ingest
    from tests.recaption.tiny_vlms import build_tiny_qwen2vl

    data = root / "images"
    emoji = min(args.images, 3900)  # every emoji glyph, then openclipart's PNGs for the rest
    sources = [{"name": "emoji", "limit": emoji}] + ([{"name": "openclipart", "limit": args.images - emoji}]
                                                      if args.images > emoji else [])
    run_ingest(from_dict(IngestConfig, {
        "sources": sources, "output": str(data), "samples_per_shard": args.shard,
        "executor": "local", "dedup": {"near": False},
        "process": {"min_side": 32, "buckets": {"base_resolution": args.resolution, "multiple": 32}}}, "bench"))
    model = build_tiny_qwen2vl(root / "model", hidden=args.hidden, layers=args.layers)
    return data, model


def plain_loop(data: Path, model_dir: Path, args: argparse.Namespace, threads: int | None) -> tuple[float, dict]:
    """One process: per batch, decode, preprocess, generate, decode, in turn. Returns (images/s, details)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _plain_loop(data, model_dir, args)
    finally:
        torch.set_num_threads(before)


def _plain_loop(data: Path, model_dir: Path, args: argparse.Namespace) -> tuple[float, dict]:
    import io
    import json

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tessera.tars import read_samples

    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    manifest = json.loads((data / "manifest.json").read_text())
    images, tokens, captions = 0, 0, []
    for shard in manifest["shards"]:
        # Grouped by aspect bucket as Tessera's worker groups them (it reads windows of a shard's size), so both
        # sides generate from the same batches: the comparison is the actors and the overlap, not the padding.
        samples = sorted(read_samples(str(data / shard["name"])),
                         key=lambda s: str(json.loads(s.members["json"]).get("bucket", "")))
        for i in range(0, len(samples), args.batch_size):
            batch = [Image.open(io.BytesIO(s.members["jpg"])).convert("RGB") for s in samples[i:i + args.batch_size]]
            inputs = processor(text=[prompt] * len(batch), images=batch, return_tensors="pt", padding=True)
            inputs.pop("token_type_ids", None)
            with torch.inference_mode():
                seq = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                                     top_p=0.9, top_k=0)
            new = seq[:, inputs["input_ids"].shape[1]:]
            captions += processor.batch_decode(new, skip_special_tokens=True)
            images, tokens = images + len(batch), tokens + int(new.numel())
    wall = time.perf_counter() - t0
    return images / wall, {"images": images, "seconds": round(wall, 2), "tokens": tokens,
                           "threads": torch.get_num_threads()}


def tessera_run(data: Path, model_dir: Path, out: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """``run_recaption`` on ``--actors`` Ray actors (Ray already up). Returns (images/s, details)."""
    from tessera.config import from_dict
    from tessera.recaption.config import RecaptionConfig
    from tessera.recaption.run import run_recaption

    shutil.rmtree(out, ignore_errors=True)
    cfg = from_dict(RecaptionConfig, {
        "source": str(data), "output": str(out), "executor": "ray", "actors": args.actors,
        "batch_size": args.batch_size, "window": args.shard, "prefetch": 2, "filters": {"reject": []},
        "captioners": [{"name": "hf", "variant": "vlm_short", "hf": {
            "model": str(model_dir), "prompt": args.prompt,
            "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 0.7, "top_p": 0.9,
                         "repetition_penalty": 1.0}}}]}, "bench")
    t0 = time.perf_counter()
    m = run_recaption(cfg)
    wall = time.perf_counter() - t0
    r = m["recaption"]
    images = r["throughput"]["images"]
    per = {w: p["images_per_s"] for w, p in r["throughput"]["per_actor"].items()}
    return images / wall, {"images": images, "seconds": round(wall, 2), "tokens": r["variants"]["vlm_short"][
        "generated_tokens"], "per_actor_images_per_s": per, "prepare_wait_s": r["stage_seconds"].get("prepare_wait")}


def main(argv: list[str] | None = None) -> int:
    """Build the inputs, start Ray once, compare the two sides, write bench/results/recaption.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6000, help="emoji first (up to 3,900), then openclipart")
    ap.add_argument("--shard", type=int, default=64, help="samples per shard (the unit of work)")
    ap.add_argument("--resolution", type=int, default=128, help="ingest base resolution (px)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="Describe this image in one sentence.")
    ap.add_argument("--one-thread", action="store_true", help="also compare with the loop on one torch thread")
    args = ap.parse_args(argv)

    import logging
    import os

    import ray

    from tessera.ray_runtime import RayConfig, ensure_ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TESSERA_NO_PROGRESS", "1")
    logging.basicConfig(level=logging.WARNING)
    report = Report("recaption", vars(args), ["torch", "transformers", "ray", "pillow"])
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-recaption-"))
    try:
        data, model = build_inputs(root, args)
        t0 = time.perf_counter()
        ensure_ray(RayConfig(object_store_memory_mb=512))
        report.note("ray_start_seconds", round(time.perf_counter() - t0, 2))
        report.note("ray_cpus", ray.cluster_resources().get("CPU"))
        what = f"hf captioner, {args.images} images, batch {args.batch_size}, {args.max_new_tokens} new tokens"
        ours = lambda: tessera_run(data, model, root / "out", args)  # noqa: E731
        results = [report.compare(Comparison(name=f"{what}: {args.actors} actors vs the plain loop as written",
                                             metric="images/s", higher_is_better=True, peer="transformers loop"),
                                  lambda: plain_loop(data, model, args, None), ours, repeats=args.repeats)]
        # Without the actors' start-up (process, imports, model load): the actors' summed shard throughput. The
        # start-up is a fixed cost per job (seconds), so this is the ratio a job of realistic size approaches.
        runs = results[0]["ours_runs"]["details"]
        steady = [sum(d["per_actor_images_per_s"].values()) for d in runs]
        report.note("tessera_fixed_seconds", [round(d["seconds"] - d["images"] / s, 2) for d, s in zip(runs, steady)])
        results.append(report.summarise(Comparison(name=f"{what}: steady state (actors' shard time, no start-up) "
                                                        "vs the plain loop as written", metric="images/s",
                                                   higher_is_better=True, peer="transformers loop"),
                                        results[0]["peer_runs"]["values"], steady))
        if args.one_thread:
            results.append(report.compare(Comparison(name=f"{what}: {args.actors} actors vs the plain loop on 1 "
                                                          "thread", metric="images/s", higher_is_better=True,
                                                     peer="loop, 1 thread"),
                                          lambda: plain_loop(data, model, args, 1), ours, repeats=args.repeats))
        report.note("goal", "speed-up >= 1.5x on 2 CPU actors")
        report.note("speedups", [round(r["speedup"], 2) for r in results])
        report.write()
        ray.shutdown()
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
