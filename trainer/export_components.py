"""How an export carries its text encoder(s) and autoencoder: by resolved path or by copy, never by alias alone.

``tessera export --components path`` (default) writes each component's resolved location into the export
(``minilm`` becomes the folder it names; in a diffusers folder, a symlink); ``--components copy`` copies the
component's files into the export and points the export at the copy. Weight files that unpickle
(``.bin``/``.pt``/``.ckpt``) are never copied: a component must hold safetensors to be carried by copy.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tessera import storage

log = logging.getLogger("tessera.export")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODES = ("path", "copy")


def local_source(path: str, subfolder: str | None = None) -> Path | None:
    """The local file or folder a component config names (aliases resolved), or None for a hub id / tag."""
    from tessera.trainer.text_encoders.runtime import resolve_path

    p = Path(resolve_path(path))
    p = p / subfolder if subfolder else p
    return p.resolve() if p.exists() else None


def copy_component(src: Path, dst: Path, config_updates: dict | None = None) -> Path:
    """Copy a model folder (or one weights file) into ``dst``, skipping pickled weights; returns ``dst``.

    ``config_updates`` are written into the copied ``config.json`` (e.g. the VAE scale Tessera applies)."""
    if src.is_file():
        if src.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{src}: pickled weights are not copied into an export; convert them to safetensors")
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / src.name)
        return dst / src.name
    files = [f for f in sorted(src.rglob("*")) if f.is_file() and ".git" not in f.parts]
    if not any(f.suffix == ".safetensors" for f in files):
        raise ValueError(f"{src}: no .safetensors weights; pickled weights are not copied into an export")
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            log.info("not copying pickled %s (the safetensors weights are copied)", f)
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    if config_updates:
        cfg_path = dst / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config_updates}, indent=2) + "\n")
    return dst


def place(src: Path, dst: Path, mode: str, config_updates: dict | None = None) -> None:
    """Put component ``src`` at ``dst``: a symlink (``path``) or a copy (``copy``)."""
    if mode == "copy":
        copy_component(src, dst, config_updates)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src, target_is_directory=src.is_dir())


def _section(spec: dict) -> dict:
    """The (attached, possibly new) section dict of a ``{name: ..., <name>: {...}}`` component config."""
    if not isinstance(spec.get(spec["name"]), dict):
        spec[spec["name"]] = {}
    return spec[spec["name"]]


def _components(meta: dict) -> list[tuple[str, str, dict]]:
    """(export name, registry name, section dict) of every path-bearing component in a ``tessera.json``."""
    te, ae = meta["text_encoder"], meta["autoencoder"]
    specs = [(f"text_encoder_{part}_{i}", spec) for part in ("channel", "sequence")
             for i, spec in enumerate(_section(te).get(part, []))] if te["name"] == "concat" else [("text_encoder", te)]
    if ae["name"] != "identity":
        specs.append(("autoencoder", ae))
    return [(name, spec["name"], _section(spec)) for name, spec in specs]


def _default_path(kind: str, name: str) -> str:
    """The path a component's config class defaults to (its section left it out)."""
    from tessera.trainer.autoencoders import configs as ae_configs
    from tessera.trainer.text_encoders import configs as te_configs

    types = ae_configs.SECTION_TYPES if name == "autoencoder" else te_configs.SECTION_TYPES
    return types[kind]().path


def carry_tessera(out: str, mode: str) -> dict:
    """Rewrite ``out/tessera.json`` so every component is named by its resolved path or an in-export copy.

    Returns ``{component: {"from": original path, "path": new path, "mode": ...}}`` (also stored as ``components``)."""
    if mode not in MODES:
        raise ValueError(f"components: {mode!r} is not one of {', '.join(MODES)}")
    meta = json.loads(storage.read_text(storage.join(out, "tessera.json")))
    record = {}
    for name, kind, sec in _components(meta):
        sec.setdefault("path", _default_path(kind, name))
        src = local_source(sec["path"], sec.get("subfolder"))
        if src is None:
            if mode == "copy":
                raise ValueError(f"{name}: {sec['path']!r} is not a local file or folder; download it first or "
                                 "export with --components path")
            record[name] = {"from": sec["path"], "path": sec["path"], "mode": "hub"}  # resolved by its library
            continue
        if mode == "copy":
            if storage.is_s3(out):
                raise ValueError("--components copy needs a local export directory")
            src = copy_component(src, Path(out) / "components" / name).resolve()
        record[name] = {"from": sec["path"], "path": str(src), "mode": mode}
        sec["path"] = str(src)
        sec.pop("subfolder", None)  # folded into the path
    meta["components"] = record
    storage.write_text(storage.join(out, "tessera.json"), json.dumps(meta, indent=1))
    return record
