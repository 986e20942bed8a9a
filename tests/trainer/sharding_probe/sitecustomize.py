"""Test-only probe for tests/trainer/test_sharded_grids.py, loaded by putting this folder first on PYTHONPATH.

With ``TESSERA_SAMPLE_PROBE=<dir>`` every process appends to ``<dir>/<pid>.jsonl`` one line per call of
``trainer.inference.sample_seeded`` (its seeds), of the FID Inception's forward (its batch size) and of each
evaluation reward's ``score`` (its name and number of images), tagged with the
process's ``RANK``. It wraps the functions when their modules are first imported, so the code under test is
measured from outside, unchanged.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys

_DIR = os.environ.get("TESSERA_SAMPLE_PROBE")


def _record(kind: str, **data) -> None:
    with open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "rank": int(os.environ.get("RANK", "-1")), **data}) + "\n")


def _patch_inference(module) -> None:
    inner = module.sample_seeded

    def sample_seeded(model, text_encoder, autoencoder, sampler_cfg, objective_cfg, prompts, seeds, **kw):
        _record("sample", seeds=[int(s) for s in seeds], prompts=list(prompts))
        return inner(model, text_encoder, autoencoder, sampler_cfg, objective_cfg, prompts, seeds, **kw)

    module.sample_seeded = sample_seeded


def _patch_inception(module) -> None:
    inner = module.FIDInception.forward

    def forward(self, x):
        _record("inception", n=int(x.shape[0]))
        return inner(self, x)

    module.FIDInception.forward = forward


def _patch_rewards(module) -> None:
    inner = module.Reward.score  # every reward's (subclasses override score_tensor / _score_pil)

    def score(self, images, prompts):
        _record("reward", name=self.name, n=len(images))
        return inner(self, images, prompts)

    module.Reward.score = score


_PATCHES = {"tessera.trainer.inference": _patch_inference, "tessera.evaluation.inception": _patch_inception,
            "tessera.evaluation.rewards": _patch_rewards}


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the patched modules through the other finders and patches them right after they execute."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
