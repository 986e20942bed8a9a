"""The recipe of docs/models.md ("Start from a published model") end to end at tiny scale, through the CLI: import a
published (tiny, built-from-config) PixArt, ingest a folder, recaption, precompute with its T5 and VAE, fine-tune,
evaluate against the base on the same prompts, export to diffusers, and load the export in diffusers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tessera.cli import main

from . import helpers as H
from . import published as P

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}


def _cli(*argv) -> str:
    """``tessera ...`` in-process; returns stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([str(a) for a in argv]) == 0
    return buf.getvalue()


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _image_folder(root: Path) -> Path:
    """24 captioned images (coloured squares on white, three aspect ratios), a folder users would have."""
    root.mkdir()
    for i in range(24):
        name, rgb = list(COLOURS.items())[i % 4]
        w, h = [(32, 32), (48, 32), (32, 48)][i % 3]
        img = np.full((h, w, 3), 255, np.uint8)
        top, left = 2 + i % 5, 2 + i // 5  # every image differs: exact dedup keeps them all
        img[top: top + h // 2, left: left + w // 2] = rgb
        Image.fromarray(img).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {name} square")
    return root


@pytest.mark.slow
def test_published_model_recipe(tmp_path):
    # 1. A "published" PixArt, its T5 and its VAE, laid out as downloads are (diffusers folders).
    P.pixart(tmp_path / "PixArt-tiny" / "transformer")
    t5, vae = P.t5_folder(tmp_path / "t5"), P.vae_folder(tmp_path / "vae")
    te = {"name": "t5", "t5": {"path": str(t5), "max_length": 24}}
    ae = {"name": "kl", "kl": {"path": str(vae)}}
    job = {"run": {"root": str(tmp_path / "runs"), "id": "finetune"}, "tracking": {"mode": "disabled"},
           "text_encoder": te, "autoencoder": ae, "objective": {"name": "ddpm"}, "cfg_dropout": {"p": 0.1},
           "data": {"path": str(tmp_path / "data_t5"), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8,
                    "caption_variants": {"alt": 0.5, "attributes": 0.5}},
           "optim": {"lr": 0.001}, "deepspeed": {"stage": 2}, "ema": {"decay": 0.9},
           "train": {"total_samples": 16, "log_every_samples": 4, "ckpt_every_samples": 16},
           "samples": {"enabled": False, "height": 32, "width": 32,
                       "sampler": {"name": "dpmpp_2m", "steps": 4, "cfg_scale": 3.0}}}
    # 2. Import it as a Tessera export (the base model) and take the printed model section for training.
    base_job = _yaml(tmp_path / "base_job.yaml", job)
    printed = _cli("import", tmp_path / "PixArt-tiny", "--out", tmp_path / "base", "--config", base_job)
    job["model"] = yaml.safe_load(printed)["model"]
    assert job["model"]["init_from"] == str(tmp_path / "base")
    # 3. Ingest a folder, recaption with the weight-free attributes captioner, precompute T5 embeddings and latents.
    _yaml(tmp_path / "ingest.yaml", {
        "sources": [{"name": "folder", "path": str(_image_folder(tmp_path / "images"))}],
        "output": str(tmp_path / "data"), "samples_per_shard": 12, "executor": "local",
        "process": {"min_side": 16, "buckets": {"base_resolution": 32, "multiple": 16}, "image_format": "png"},
        "dedup": {"exact": True, "near": False}})
    _cli("data", "ingest", "--config", tmp_path / "ingest.yaml")
    _yaml(tmp_path / "recaption.yaml", {
        "source": str(tmp_path / "data"), "output": str(tmp_path / "data_attr"), "executor": "local",
        "captioners": [{"name": "attributes", "variant": "attributes"}],
        "filters": {"tokenizer": str(t5), "min_tokens": 1, "max_tokens": 128}})  # T5 here reads bytes
    _cli("data", "recaption", "--config", tmp_path / "recaption.yaml")
    _yaml(tmp_path / "precompute.yaml", {
        "source": str(tmp_path / "data_attr"), "output": str(tmp_path / "data_t5"), "text_encoder": te,
        "autoencoder": ae, "variants": [], "executor": "local", "batch_size": 8})
    _cli("data", "precompute", "--config", tmp_path / "precompute.yaml")
    # 4. Fine-tune (full) from the imported weights.
    train_cfg = _yaml(tmp_path / "train.yaml", job)
    r = subprocess.run([sys.executable, "-m", "tessera.cli", "train", "--config", str(train_cfg)], env=H.env(),
                       cwd=H.ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "finetune"
    rows = H.metrics(run)
    assert sum(r.get("data/variants/attributes", 0) for r in rows) > 0  # the recaptioned variant was trained on
    assert sum(r["onthefly/text_encoded"] + r["onthefly/latents_encoded"] for r in rows if "loss" in r) == 0
    # A checkpoint (here the run directory) is itself a source: it starts the next run, e.g. at a new resolution.
    from tessera.config import from_dict
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.inference import load_for_sampling

    new_size = {**job["model"]["dit"], "base_size": 8}  # positions recalibrated: every tensor still loads
    nxt = from_dict(ModelConfig, {**job["model"], "init_from": str(run), "dit": new_size})
    ema = load_for_sampling(str(run), device=torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in nxt.build().state_dict().items())
    # 5. Evaluate the base and the fine-tuned model on the same prompts (colour adherence, weight-free).
    (tmp_path / "prompts.txt").write_text("".join(f"a {c} square\n" for c in COLOURS))
    suite = _yaml(tmp_path / "suite.yaml", {
        "name": "recipe", "prompts": {"path": str(tmp_path / "prompts.txt")},
        "sampling": {"images_per_prompt": 1, "steps": 4, "cfg_scale": 3.0, "height": 32, "width": 32},
        "fid": {"enabled": False}, "kid": {"enabled": False}, "colour": {"enabled": True},
        "output": str(tmp_path / "eval"), "report": False, "tracking": {"mode": "disabled"}})
    _cli("eval", "--config", suite, "--checkpoint", tmp_path / "base", "--checkpoint", run)
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoints"]
    assert [c["checkpoint"]["kind"] for c in evaluated] == ["export", "checkpoint"]
    assert [c["prompts"]["sha256"] for c in evaluated][0] == evaluated[1]["prompts"]["sha256"]  # the same prompts
    assert all(c["metrics"]["colour_scored"] == 4 for c in evaluated)
    # 6. Export: Tessera's format names its encoder and VAE by resolved path; diffusers' format loads in diffusers.
    _cli("export", "--checkpoint", run, "--out", tmp_path / "tessera_export")
    carried = json.loads((tmp_path / "tessera_export" / "tessera.json").read_text())["components"]
    assert {k: v["path"] for k, v in carried.items()} == {"text_encoder": str(t5), "autoencoder": str(vae)}
    _cli("export", "--checkpoint", run, "--out", tmp_path / "diffusers", "--format", "diffusers",
         "--components", "copy")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "diffusers")
    call = json.loads((tmp_path / "diffusers" / "tessera_diffusers.json").read_text())["call"]
    img = pipe("a red square", generator=torch.Generator().manual_seed(0), **call).images[0]
    assert img.size == (32, 32)
    # The fine-tuned weights, not the base, went out: they moved away from the import.
    from tessera.trainer.models import load_pretrained

    base = load_pretrained(tmp_path / "base" / "raw")
    moved = pipe.transformer.transformer_blocks[0].attn1.to_out[0].weight
    assert not torch.allclose(moved, base.blocks[0].attn.proj.weight)
