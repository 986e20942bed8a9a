"""A distilled student as a diffusers folder with its own scheduler: ``tessera distill-export``.

``tessera export --format diffusers`` writes ``scheduler/`` only inside a whole pipeline (a T5 encoder and a KL
VAE). A consistency student is useless without its scheduler, so this writes ``scheduler/`` (diffusers'
``LCMScheduler``: the student's distillation grid, ``original_inference_steps``, and LCM's boundary scalings) next
to ``transformer/`` whatever the pipeline's fate, for the families where diffusers has one: DDPM objectives. A
flow student's ``lcm`` grid is the shifted i / N levels, which ``FlowMatchLCMScheduler`` does not build from its
config; it and ``euler_uniform`` students keep Tessera's format (``tessera sample`` reads it), as the notes say.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("tessera.export")


def export_student(checkpoint: str, out: str, *, components: str = "path", use_ema: bool = True) -> list[str]:
    """Export ``checkpoint`` (a distillation run, checkpoint or export) as a diffusers folder plus its scheduler;
    returns the notes (what could not be written, and why)."""
    import diffusers

    from tessera.trainer.export_diffusers import NotMappable, _typed, export_any, scheduler_for

    export_any(checkpoint, out, fmt="diffusers", components=components, use_ema=use_ema)
    out_p = Path(out)
    if (out_p / "scheduler").exists():  # a whole pipeline: its scheduler is the student's already
        return []
    meta = json.loads((out_p / "tessera.json").read_text())
    objective, sampler = _typed(meta)
    try:
        if sampler.name != "lcm":
            raise NotMappable(f"the student samples with {sampler.name!r}")
        name, kwargs = scheduler_for(objective, sampler)
    except NotMappable as e:
        note = f"no diffusers scheduler/ for this student ({e}): `tessera sample --checkpoint {out}` samples it"
        log.warning("distill-export: %s", note)
        return [note]
    getattr(diffusers, name)(**kwargs).save_pretrained(out_p / "scheduler")
    log.info("distill-export: %s/scheduler is a diffusers %s (%d-point grid, %d steps by default)", out, name,
             sampler.lcm_origin_steps, sampler.steps)
    return []
