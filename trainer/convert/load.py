"""Read the weights users have and map them onto a Tessera model family.

``read_weights(path)`` recognises, from the files alone:

* a diffusers model folder (``config.json`` with ``_class_name``, safetensors weights) or a pipeline root
  (``model_index.json`` with ``transformer/`` or ``unet/``): ``PixArtTransformer2DModel`` -> ``dit``,
  ``SD3Transformer2DModel`` -> ``mmdit``, ``UNet2DConditionModel`` -> ``unet``. Loaded with the class's own
  ``from_pretrained(path, local_files_only=True, use_safetensors=True)``: the real path, never the hub;
* the original DiT release, a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file;
* Tessera's own formats: an export (``tessera.json``), a model folder written by ``tessera import``
  (``config.json`` with ``family`` + ``model.safetensors``), or a training checkpoint / run directory,
  read only through ``trainer.inference`` so a change of checkpoint format does not reach here.

``load_into(model, weights, strict)`` then checks the architecture and every key and shape against the
built model: strict (the default) raises one ``MappingError`` listing every problem; non-strict loads what
fits, logs the rest, and leaves those tensors at their fresh initialisation.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tessera import storage
from tessera.trainer.convert import dit_original, keys, pixart, sd3
from tessera.trainer.convert.keys import MappingError, Report

log = logging.getLogger("tessera.convert")

DIFFUSERS_FAMILIES = {**{n: "dit" for n in pixart.CLASS_NAMES}, **{n: "mmdit" for n in sd3.CLASS_NAMES},
                      "UNet2DConditionModel": "unet"}
# Fields that describe how a model runs, not its weights: never a mismatch.
RUNTIME_FIELDS = ("preset", "gradient_checkpointing", "pretrained", "vae_scale_factor")
# Position calibration: a new value continues the weights at a new resolution, so a difference is logged, not refused.
RESOLUTION_FIELDS = ("base_size", "interpolation_scale")


@dataclass
class Weights:
    """Tessera-named tensors of one family, with the config fields they imply and what they leave fresh."""

    family: str
    config: dict
    state: dict[str, torch.Tensor]
    kind: str  # pixart | sd3 | unet | dit-original | tessera
    source: str
    report: Report = field(default_factory=Report)
    fresh: tuple[str, ...] = ()  # glob patterns of target keys the source does not provide, by design
    dropped: tuple[str, ...] = ()  # source key prefixes dropped by design (derived buffers, re-parameterised)


def _diffusers_dir(path: Path) -> Path | None:
    """The model folder (with ``config.json`` naming a known class) at ``path``, or in a pipeline root."""
    for d in (path, path / "transformer", path / "unet"):
        cfg = d / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") in DIFFUSERS_FAMILIES:
            return d
    return None


def _from_diffusers(d: Path, keep_sigma: bool) -> Weights:
    """Load a diffusers model folder with its own class and map it."""
    import diffusers

    name = json.loads((d / "config.json").read_text())["_class_name"]
    family = DIFFUSERS_FAMILIES[name]
    cls = {"dit": diffusers.PixArtTransformer2DModel, "mmdit": diffusers.SD3Transformer2DModel,
           "unet": diffusers.UNet2DConditionModel}[family]
    model = cls.from_pretrained(d, local_files_only=True, use_safetensors=True)
    dcfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    sd = model.state_dict()
    ignored = sorted(_file_keys(d) - set(sd))  # from_pretrained only warns about tensors its class lacks
    if family == "unet":  # diffusers' own class inside ours: the names only gain our "unet." prefix
        w = Weights("unet", {"kwargs": dcfg}, {f"unet.{k}": v for k, v in sd.items()}, "unet", str(d))
        w.report.unused_source += ignored
        return w
    conv = pixart if family == "dit" else sd3
    why = conv.unsupported(dcfg)
    if why:
        raise MappingError(f"{d}: this {name} has no Tessera {family} equivalent: {'; '.join(why)}")
    cfg = pixart.to_tessera_config(dcfg, keep_sigma) if family == "dit" else sd3.to_tessera_config(dcfg)
    w = Weights(family, cfg, {}, "pixart" if family == "dit" else "sd3", str(d), dropped=getattr(conv, "DERIVED", ()))
    w.state = keys.apply(conv.rules(_cfg_obj(family, cfg)), sd, w.report)
    w.report.unused_source += ignored
    if family == "dit" and cfg["out_channels"] != dcfg.get("out_channels", cfg["out_channels"]):
        lin = "final_layer.linear"
        for p in ("weight", "bias"):
            w.state[f"{lin}.{p}"] = pixart.drop_sigma(w.state[f"{lin}.{p}"], cfg["patch_size"], cfg["out_channels"])
    return w


def _file_keys(d: Path) -> set[str]:
    """Tensor names in a diffusers folder's safetensors files (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    return names


def _cfg_obj(family: str, fields: dict):
    """The typed config of ``family`` from plain fields."""
    from tessera.config import from_dict
    from tessera.trainer.models import config_class

    return from_dict(config_class(family), fields, f"{family} config")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin`` read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects (e.g. an argparse Namespace next to the weights)
        raise MappingError(f"{path}: not a plain tensor checkpoint ({type(e).__name__}: {e}); only weights are read, "
                           "never pickled objects") from e
    for wrapper in ("ema", "model", "state_dict"):  # DiT training checkpoints keep weights under these keys
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    return obj


def _from_dit_original(path: Path, target, keep_sigma: bool, text_dim: int | None, num_heads: int | None) -> Weights:
    """Map the original DiT release (see ``dit_original``)."""
    sd = {k: v.float() for k, v in _read_file(path).items()}
    if not dit_original.is_original_dit(sd):
        raise MappingError(f"{path}: unrecognised key layout (first keys: {', '.join(list(sd)[:6])}); expected the "
                           "original DiT's (x_embedder.proj, blocks.N.adaLN_modulation, y_embedder.embedding_table)")
    if target is not None:
        text_dim, num_heads = target.text_dim, target.num_heads
        keep_sigma = target.out_channels != target.in_channels
    cfg = dit_original.to_tessera_config(sd, text_dim or 4096, num_heads, keep_sigma)
    dit_original.check_pos_embed(sd, cfg["base_size"])
    w = Weights("dit", cfg, {}, "dit-original", str(path), fresh=("y_embedder.*", "blocks.*.cross_attn.*"),
                dropped=dit_original.CONSUMED)
    w.state = keys.apply(dit_original.rules(cfg["depth"]), sd, w.report)
    w.state.update(dit_original.reparameterise(sd, cfg["depth"]))
    if cfg["out_channels"] != sd["final_layer.linear.weight"].shape[0] // cfg["patch_size"] ** 2:
        for p in ("weight", "bias"):
            k = f"final_layer.linear.{p}"
            w.state[k] = pixart.drop_sigma(w.state[k], cfg["patch_size"], cfg["out_channels"])
    return w


def _from_tessera(path: str, use_ema: bool) -> Weights | None:
    """A Tessera export, ``tessera import`` folder, checkpoint or run directory; None if ``path`` is none of them."""
    from safetensors.torch import load as load_bytes

    model_dir = None
    if storage.exists(storage.join(path, "tessera.json")):  # an export: the stable format is read directly
        meta = json.loads(storage.read_text(storage.join(path, "tessera.json")))
        model_dir = storage.join(path, "ema" if use_ema and "ema" in meta["variants"] else "raw")
    elif storage.exists(storage.join(path, "model.safetensors")) and storage.exists(storage.join(path, "config.json")):
        model_dir = path
    if model_dir is not None:
        meta = json.loads(storage.read_text(storage.join(model_dir, "config.json")))
        if "family" not in meta:
            return None
        state = load_bytes(storage.read_bytes(storage.join(model_dir, "model.safetensors")))
        return Weights(meta["family"], meta["config"], state, "tessera", model_dir)
    from tessera.trainer.inference import load_for_sampling, resolve_checkpoint

    try:
        kind, url = resolve_checkpoint(path)
    except FileNotFoundError:
        return None
    from tessera.config import to_dict

    model = load_for_sampling(url, use_ema=use_ema, device=torch.device("cpu"))[0]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return Weights(model.family, to_dict(model.config), state, "tessera", url)


def read_weights(path: str, *, target=None, keep_sigma: bool = False, text_dim: int | None = None,
                 num_heads: int | None = None, use_ema: bool = True) -> Weights:
    """Recognise and map the weights at ``path`` (see the module docstring); ``target`` is the typed config of
    the model they will load into, which settles what the files cannot say (text width, heads, variance)."""
    p = Path(str(path))
    if not storage.is_s3(str(path)) and p.is_file():
        return _from_dit_original(p, target, keep_sigma, text_dim, num_heads)
    if not storage.is_s3(str(path)) and p.is_dir() and (d := _diffusers_dir(p)) is not None:
        if target is not None and hasattr(target, "out_channels") and hasattr(target, "learn_sigma"):
            keep_sigma = target.out_channels != target.in_channels
        return _from_diffusers(d, keep_sigma)
    w = _from_tessera(str(path), use_ema)
    if w is None:
        raise FileNotFoundError(f"{path}: no weights recognised (a diffusers model folder or pipeline root, an "
                                "original DiT .pt/.safetensors file, or a Tessera export, checkpoint or run)")
    return w


def _config_mismatches(model, w: Weights) -> list[str]:
    """Architecture fields the weights imply that differ from the model's config."""
    from tessera.config import to_dict

    ours = to_dict(model.config)
    bad = []
    for k, v in w.config.items():
        if k in RUNTIME_FIELDS or k not in ours:
            continue
        if k == "kwargs" and model.family == "unet":  # compare against the built UNet's full constructor kwargs
            have = model.diffusers_config()
            bad += [f"unet.{a}: model {have.get(a)!r}, weights {b!r}" for a, b in v.items()
                    if a in have and _norm(have[a]) != _norm(b)]
        elif _norm(ours[k]) != _norm(v) and k in RESOLUTION_FIELDS:
            log.info("%s: the weights were trained with %s=%r; continuing with %r", w.source, k, v, ours[k])
        elif _norm(ours[k]) != _norm(v):
            bad.append(f"{k}: model {ours[k]!r}, weights {v!r}")
    return bad


def _norm(v):
    """Compare configs loosely: tuples as lists, ints as floats."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def load_into(model: torch.nn.Module, w: Weights, strict: bool = True) -> Report:
    """Load ``w`` into ``model`` after checking family, architecture, keys and shapes (see the module docstring)."""
    what = f"{w.source} ({w.kind}) -> {model.family}"
    if w.family != model.family:
        raise MappingError(f"{what}: the weights are a {w.family!r} model, the config builds a {model.family!r}")
    bad = _config_mismatches(model, w)
    if bad and strict:
        raise MappingError(f"{what}: the model config does not match the weights (strict):\n  " + "\n  ".join(bad))
    for b in bad:
        log.warning("%s (non-strict): config differs: %s", what, b)
    target = model.state_dict()
    keep = keys.check_against(w.state, target, w.report)
    fresh = [k for k in w.report.missing_target if any(fnmatch.fnmatchcase(k, pat) for pat in w.fresh)]
    w.report.missing_target = [k for k in w.report.missing_target if k not in fresh]
    keys.finish(w.report, what, strict, allowed_unused=w.dropped)
    model.load_state_dict(keep, strict=False)
    log.info("%s: loaded %d tensors%s", what, len(keep),
             f"; {len(fresh)} freshly initialised by design" if fresh else "")
    return w.report
