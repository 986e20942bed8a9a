"""Published weights in and out: key maps between diffusers / original-release models and Tessera's families.

* ``load.read_weights(path)`` recognises a diffusers model folder or pipeline root (PixArt-α/Σ, SD3/SD3.5,
  SD/SDXL UNet), the original DiT release, or a Tessera export/checkpoint, and maps it to Tessera's names;
* ``load.load_into(model, weights, strict)`` checks architecture, keys and shapes, then loads;
* ``init_weights(model, path, strict)`` is both, for ``model.init_from``;
* ``pixart``, ``sd3``, ``dit_original``: one key table each, applied in both directions (export reuses them).

See docs/models.md for what maps, what is re-initialised, and the strict/non-strict switch.
"""

from __future__ import annotations

from tessera.trainer.convert.keys import MappingError, Report
from tessera.trainer.convert.load import Weights, load_into, read_weights


def import_model(source: str, out: str, *, strict: bool = True, job=None, **options) -> str:
    """``tessera import``: map ``source`` onto its Tessera family and write it to ``out``; returns the ``model:`` YAML
    section that trains from it (``init_from: out``).

    Without ``job``, ``out`` is a model folder (``model.safetensors + config.json``). With a training config
    ``job`` (a ``TrainJobConfig``), ``out`` is a Tessera export whose ``tessera.json`` takes the job's text encoder,
    autoencoder, objective and sampler: ``tessera sample`` and ``tessera eval`` read it as the base model."""
    import dataclasses

    from tessera.config import dump_yaml, from_dict
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.models import build_model, config_class, save_pretrained

    w = read_weights(source, **options)
    model = build_model(w.family, w.config)
    load_into(model, w, strict=strict)
    typed = from_dict(config_class(w.family), w.config, source)
    section = (ModelConfig(name=w.family, **{w.family: typed}) if w.family in ("dit", "mmdit", "unet")
               else ModelConfig(name=w.family, options=w.config))  # a plugin family's section
    if job is None:
        save_pretrained(model, out)
    else:
        from tessera.trainer.export import write_export

        write_export(out, dataclasses.replace(job, model=section), {"raw": model.state_dict()}, source=str(source),
                     step=0, samples=0, extra={"imported_from": str(source), "import_kind": w.kind})
    return dump_yaml({"model": dataclasses.replace(section, init_from=str(out), init_strict=strict)})


def init_weights(model, path: str, strict: bool = True) -> Report:
    """Load the weights at ``path`` into a freshly built ``model`` (``model.init_from``); returns what was left out."""
    return load_into(model, read_weights(path, target=model.config), strict=strict)


__all__ = ["MappingError", "Report", "Weights", "import_model", "init_weights", "load_into", "read_weights"]
