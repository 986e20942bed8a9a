"""The one-rank reference for tests/trainer/test_sharded_grids.py, run as a subprocess (the ranks' environment:
one thread, whose BLAS and oneDNN roundings the FID's eigensolver and the Inception then share):

    python -m tests.trainer.one_rank_reference RUN_DIR OUT_DIR PROMPTS_JSON SUITE_OVERRIDES_JSON

From the run's newest checkpoint (the EMA weights its last grid and evaluation sampled), unsharded and as the
trainer did before sharding: the grid of every prompt in one ``inference.generate`` call (``OUT_DIR/grid.png``),
and the quick suite's metrics from one generator call and ``MetricSet.evaluate`` (``OUT_DIR/metrics.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(run: str, out: str, prompts_json: str, overrides_json: str) -> None:
    from tessera.config import to_dict
    from tessera.evaluation.config import load_suite, resolve_spec
    from tessera.evaluation.generate import ModelGenerator, image_seed, work_items
    from tessera.evaluation.images import PILSource
    from tessera.evaluation.metrics import MetricSet
    from tessera.trainer.inference import generate, job_config, load_for_sampling, make_grid, png_bytes
    from tessera.trainer.inference import resolve_checkpoint

    cpu = torch.device("cpu")
    model, te, ae, obj, smp, size = load_for_sampling(run, device=cpu)
    sc = job_config(resolve_checkpoint(run)[1]).samples
    grid_prompts = json.loads(prompts_json)
    images = generate(model, te, ae, smp, obj, grid_prompts, height=size[0], width=size[1], seed=sc.seed, device=cpu)
    Path(out, "grid.png").write_bytes(png_bytes(make_grid(images, grid_prompts, scale=max(1, 96 // size[0]))))

    suite = load_suite(Path(__file__).resolve().parents[2] / "configs" / "eval" / "quick.yaml",
                       json.loads(overrides_json))
    spec = resolve_spec(suite.sampling, to_dict(smp), size)
    ms = MetricSet(suite)
    prompts = ms.prompts()
    items = work_items(len(prompts), suite.sampling.images_per_prompt)
    gen = ModelGenerator(model, te, ae, obj, spec)
    ims = gen([prompts[p] for p, _ in items], [image_seed(suite.sampling.seed, p, k) for p, k in items])
    metrics, _, _, _ = ms.evaluate(PILSource(ims), items, lambda it: ims[items.index(it)], prompts)
    Path(out, "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main(*sys.argv[1:5])
