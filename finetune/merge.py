"""Merging a PEFT LoRA adapter into a base checkpoint or export, on request (``tessera merge-lora``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tessera import storage
from tessera.finetune.policy import base_job_config, merged_weights
from tessera.trainer.export import ADAPTER_DIR, write_export
from tessera.trainer.inference import load_for_sampling


def merge_adapter(base: str, adapter: str, out: str, use_ema: bool = True) -> str:
    """Export ``base`` with the adapter at ``adapter`` merged into its (EMA or raw) weights; returns ``out``."""
    from peft import PeftModel

    model = load_for_sampling(base, use_ema=use_ema, device=torch.device("cpu"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            url = storage.join(adapter, name)
            if not storage.exists(url):
                raise FileNotFoundError(url)
            (Path(tmp) / name).write_bytes(storage.read_bytes(url))
        peft_model = PeftModel.from_pretrained(model, tmp)  # loads safetensors only
        weights = merged_weights(peft_model)
        write_export(out, base_job_config(base), {"raw": weights}, source=f"{base} + {adapter}", step=0, samples=0)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            storage.write_bytes(storage.join(out, ADAPTER_DIR, name), (Path(tmp) / name).read_bytes())
    return out
