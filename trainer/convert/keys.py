"""Key maps between published state dicts and Tessera's, written once and applied in both directions.

A map is a list of ``Rule(ours, theirs, kind)``: Tessera key ``ours`` is built from source key(s) ``theirs``.

* ``copy``: the same tensor;
* ``cat``: several source tensors joined on dim 0 (q, k, v -> one fused QKV linear);
* ``conv``: a patch-embedding conv weight (D, C, p, p) <-> our linear weight (D, C*p*p), same element order;
* ``swap``: the two halves on dim 0 exchanged (diffusers' AdaLayerNormContinuous is (scale, shift), ours is
  (shift, scale)); the operation is its own inverse.

Import and export apply the same list, so one table is the whole truth about a mapping. Every key that is
missing, left over or mis-shaped is collected and reported at once (``MappingError``), or, non-strict,
logged and skipped so the target keeps its fresh initialisation for those tensors.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("tessera.convert")


class MappingError(ValueError):
    """Weights that do not map: names every missing, unmapped and mis-shaped key."""


@dataclass(frozen=True)
class Rule:
    """Tessera key ``ours`` <- source keys ``theirs`` by ``kind`` (copy | cat | conv | swap)."""

    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"


def linear(ours: str, theirs: str | tuple[str, ...], kind: str | None = None) -> list[Rule]:
    """Rules for a linear layer's weight and bias (``theirs`` several names: a fused ``cat``)."""
    names = (theirs,) if isinstance(theirs, str) else tuple(theirs)
    kind = kind or ("cat" if len(names) > 1 else "copy")
    return [Rule(f"{ours}.{p}", tuple(f"{n}.{p}" for n in names), "copy" if kind == "conv" and p == "bias" else kind)
            for p in ("weight", "bias")]


def param(ours: str, theirs: str) -> list[Rule]:
    """A rule for a single parameter (a modulation table, a norm weight)."""
    return [Rule(ours, (theirs,))]


@dataclass
class Report:
    """What a mapping left out, by kind; ``problems()`` is empty when everything fits."""

    missing_source: list[str] = field(default_factory=list)  # source keys a rule needs but the source lacks
    unused_source: list[str] = field(default_factory=list)  # source keys no rule reads
    missing_target: list[str] = field(default_factory=list)  # target keys nothing provides (stay fresh)
    unexpected: list[str] = field(default_factory=list)  # mapped keys the target model does not have
    mis_shaped: list[str] = field(default_factory=list)  # "key: got (..) want (..)"

    def problems(self) -> list[str]:
        """One line per non-empty category, listing its keys."""
        out = []
        for name in ("missing_source", "unused_source", "missing_target", "unexpected", "mis_shaped"):
            keys = getattr(self, name)
            if keys:
                out.append(f"{name.replace('_', ' ')} ({len(keys)}): {', '.join(keys[:20])}"
                           + (" ..." if len(keys) > 20 else ""))
        return out


def apply(rules: list[Rule], source: dict[str, torch.Tensor], report: Report) -> dict[str, torch.Tensor]:
    """Tessera tensors built from ``source`` (import direction); records missing and unused source keys."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        absent = [k for k in r.theirs if k not in source]
        if absent:
            report.missing_source += absent
            continue
        ts = [source[k] for k in r.theirs]
        used.update(r.theirs)
        if r.kind == "cat":
            out[r.ours] = torch.cat(ts, dim=0)
        elif r.kind == "conv":
            out[r.ours] = ts[0].reshape(ts[0].shape[0], -1)
        elif r.kind == "swap":
            a, b = ts[0].chunk(2, dim=0)
            out[r.ours] = torch.cat([b, a], dim=0)
        else:
            out[r.ours] = ts[0]
    report.unused_source += sorted(k for k in source if k not in used)
    return out


def invert(rules: list[Rule], ours: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Source-format tensors from Tessera's (export direction); ``shapes`` are the target's (for ``conv``)."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        t = ours[r.ours]
        if r.kind == "cat":
            out.update(zip(r.theirs, (c.contiguous() for c in t.chunk(len(r.theirs), dim=0))))
        elif r.kind == "conv":
            out[r.theirs[0]] = t.reshape(shapes[r.theirs[0]])
        elif r.kind == "swap":
            a, b = t.chunk(2, dim=0)
            out[r.theirs[0]] = torch.cat([b, a], dim=0)
        else:
            out[r.theirs[0]] = t
    return out


def check_against(mapped: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: Report) -> dict:
    """Keep the mapped tensors whose name and shape the target has; record the rest in ``report``."""
    keep = {}
    for k, v in mapped.items():
        if k not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(target[k].shape):
            report.mis_shaped.append(f"{k}: got {tuple(v.shape)} want {tuple(target[k].shape)}")
        else:
            keep[k] = v
    report.missing_target += sorted(k for k in target if k not in mapped)
    return keep


def finish(report: Report, what: str, strict: bool, allowed_unused: tuple[str, ...] = ()) -> None:
    """Raise ``MappingError`` listing every problem (strict), or log them as warnings (non-strict).

    ``allowed_unused``: glob patterns of source keys a mapping drops on purpose (derived buffers, tensors folded
    into others)."""
    report.unused_source = [k for k in report.unused_source
                            if not any(fnmatch.fnmatchcase(k, pat) for pat in allowed_unused)]
    problems = report.problems()
    if not problems:
        return
    if strict:
        raise MappingError(f"{what}: weights do not map onto the model (strict; pass strict=False / --non-strict "
                           "to load what fits and keep fresh weights for the rest):\n  " + "\n  ".join(problems))
    for p in problems:
        log.warning("%s (non-strict): %s", what, p)
