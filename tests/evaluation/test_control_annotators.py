"""Annotators (evaluation/annotators*.py): weight-free conditions keep the image's size and score a perfect match
at their best; edge F1 falls when edges move; the model-based registry entry loads a tiny local depth model
(built from a config) and names its weights in its identity; a missing folder is an error naming it."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.evaluation.annotators import AnnotatorConfig, annotator_identity, build_annotator, edge_scores


def square(h: int, w: int, x0: int, y0: int, side: int) -> np.ndarray:
    """A white square on black, (H, W, 3) uint8."""
    img = np.zeros((h, w, 3), np.uint8)
    img[y0:y0 + side, x0:x0 + side] = 255
    return img


@pytest.mark.parametrize("name,metric", [("canny", "edge_f1"), ("soft_edge", "soft_edge_l1"),
                                         ("colour_layout", "layout_l1"), ("grayscale", "gray_l1")])
def test_weight_free_annotators_keep_size_and_score_themselves_best(name, metric):
    ann = build_annotator(AnnotatorConfig(name=name))
    img, moved = square(24, 40, 4, 4, 10), square(24, 40, 22, 10, 10)
    cond = ann.annotate([img])[0]
    assert cond.shape[:2] == (24, 40) and cond.dtype == np.uint8
    same, other = ann.score([img, moved], [cond, cond])
    best, worst = (1.0, 0.0) if ann.higher_is_better else (0.0, 1.0)
    assert same[metric] == best
    assert (other[metric] < same[metric]) if ann.higher_is_better else (other[metric] > same[metric])


def test_edge_f1_counts_near_edges_within_tolerance():
    a = np.zeros((10, 10), np.uint8)
    a[5] = 255
    b = np.roll(a, 1, axis=0)  # one pixel off
    assert edge_scores(b, a, tolerance=1)["edge_f1"] == 1.0
    assert edge_scores(b, a, tolerance=0)["edge_f1"] == 0.0
    assert edge_scores(np.zeros_like(a), np.zeros_like(a), 1)["edge_f1"] == 1.0


def test_depth_annotator_loads_a_tiny_local_model(tmp_path):
    import torch
    import transformers as T

    torch.manual_seed(0)
    bb = T.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        patch_size=14, image_size=28, out_features=["stage1", "stage2"], reshape_hidden_states=False)
    cfg = T.DepthAnythingConfig(backbone_config=bb, fusion_hidden_size=8, neck_hidden_sizes=[8, 8],
                                reassemble_factors=[1, 1], head_hidden_size=8, patch_size=14, reassemble_hidden_size=16)
    T.DepthAnythingForDepthEstimation(cfg).save_pretrained(tmp_path / "depth")
    T.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False,
                        ensure_multiple_of=14).save_pretrained(tmp_path / "depth")
    a = AnnotatorConfig(name="depth", options={"path": str(tmp_path / "depth"), "device": "cpu"})
    out = build_annotator(a).annotate([np.random.default_rng(0).integers(0, 255, (20, 36, 3), np.uint8)])
    assert out[0].shape == (20, 36) and out[0].dtype == np.uint8 and out[0].max() == 255  # min-max scaled
    before = annotator_identity(a)["weights"]
    T.DepthAnythingForDepthEstimation(cfg).save_pretrained(tmp_path / "depth")  # other (random) weights
    assert annotator_identity(a)["weights"] != before
    with pytest.raises(FileNotFoundError, match="no model folder at .*nowhere"):
        build_annotator(AnnotatorConfig(name="depth", options={"path": str(tmp_path / "nowhere")}))
