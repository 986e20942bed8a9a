"""An eval suite with a control set: prompts from the held-out conditioned samples, images generated with their
conditions, control adherence reported beside the floor (control scale 0) and the ceiling (real images), and the
report's condition | generated | no control | real rows."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer import helpers as H
from tests.trainer.control_data import write_moving_shapes
from tests.trainer.models.conftest import perturb


@pytest.fixture(scope="module")
def control_export(tmp_path_factory):
    """(tmp, export dir of a DiT control branch with a live branch, conditioned held-out dataset)."""
    from tessera.config import from_dict, load_config
    from tessera.data_pipeline.condition import run_condition
    from tessera.data_pipeline.condition_config import ConditionJobConfig
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.export import write_export
    from tessera.trainer.models import save_pretrained
    from tessera.trainer.models.control import branch_weights

    tmp = tmp_path_factory.mktemp("ctl_eval")
    enc = H.tiny_text_encoder(tmp / "enc")
    write_moving_shapes(tmp / "held", n=6, size=16, shards=1, seed=3)
    run_condition(from_dict(ConditionJobConfig, {"source": str(tmp / "held"), "output": str(tmp / "held_canny"),
                                                 "conditions": {"canny": {"name": "canny"}}, "executor": "local"}, "t"))
    ovs = [f"text_encoder.t5.path={enc}", "data.path=unused"]
    torch.manual_seed(0)
    save_pretrained(perturb(load_config(TrainJobConfig, H.TINY_CONFIG, ovs).model.build()), tmp / "base")
    cfg = load_config(TrainJobConfig, H.TINY_CONFIG, ovs + [f"model.init_from={tmp / 'base'}",
                                                             "model.control={condition: canny, blocks: 1}"])
    model = cfg.model.build()
    perturb(model.control, seed=4)
    write_export(str(tmp / "export"), cfg, {"ema": branch_weights(model)}, source="test", step=3, samples=12)
    return tmp, tmp / "export", tmp / "held_canny"


def test_suite_reports_control_adherence_with_floor_and_ceiling(control_export):
    from tessera.evaluation.config import load_suite
    from tessera.evaluation.suite import run_suite

    tmp, export, held = control_export
    suite = tmp / "suite.yaml"
    suite.write_text(json.dumps({"name": "ctl", "fid": {"enabled": False}, "kid": {"enabled": False},
                                 "sampling": {"steps": 2, "batch_size": 4, "device": "cpu"},
                                 "control": {"enabled": True, "dataset": str(held), "n": 5},
                                 "output": str(tmp / "eval")}))
    out = run_suite(load_suite(suite), [str(export)])
    rec = out["checkpoints"][0]
    m = rec["metrics"]
    assert rec["prompts"]["n"] == 5 and m["n_images"] == 5
    assert m["control/edge_f1_ceiling"] == 1.0  # the real images give back their own Canny edges
    assert 0.0 <= m["control/edge_f1"] <= 1.0 and 0.0 <= m["control/edge_f1_floor"] <= 1.0
    c = rec["adherence"]["control"]
    gen, floor = c["value"], c["floor"]
    assert gen == m["control/edge_f1"] and floor == m["control/edge_f1_floor"]
    # The floor's images are the model at scale 0, generated apart: different images from the controlled ones.
    from tessera.evaluation.generate import ImageFolder
    import numpy as np

    a = np.asarray(ImageFolder(rec["folder"]).read_image((0, 0)))
    b = np.asarray(ImageFolder(c["floor_folder"]).read_image((0, 0)))
    assert not np.array_equal(a, b)
    html = (tmp / "eval" / "report.html").read_text()
    assert "Control adherence (canny: edge_f1" in html and "floor (no control)" in html and 'title="real"' in html
    rows = [json.loads(line) for line in (tmp / "eval" / rec["label"] / "scores.jsonl").read_text().splitlines()]
    assert all("control/edge_f1" in r for r in rows)
