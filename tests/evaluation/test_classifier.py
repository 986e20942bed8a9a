"""The fixed classifier: trained by `tessera train-classifier` on a labelled dataset (a KEY.json field or a caption
template), saved as safetensors + config.json with its held-out accuracy, loaded back with the API the
``classifier`` reward uses (labels, image_size, differentiable predict_logits at any size, predict on PIL)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tessera.evaluation.classifier import ImageClassifier, load_classifier, pil_to_tensor, read_labelled

SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One filled shape of a random colour, size and position on a random light background."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(170, 255) for _ in range(3)))
    r = rng.randint(7, 12)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = tuple(rng.randint(0, 120) for _ in range(3))
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def shapes_dataset(root: Path, per_class: int, label_in_json: bool) -> Path:
    """A labelled Tessera dataset through the real `folder` ingest: captions "a drawing of a {shape}"."""
    from tessera.config import from_dict
    from tessera.data_pipeline.ingest import IngestConfig, run_ingest

    folder, rng = root / "folder", random.Random(0)
    folder.mkdir(parents=True)
    for shape in SHAPES:
        for k in range(per_class):
            draw_shape(shape, rng).save(folder / f"{shape}_{k:03d}.png")
            side = {"caption": f"a drawing of a {shape}"}
            if label_in_json:
                side["label"] = shape
            (folder / f"{shape}_{k:03d}.json").write_text(json.dumps(side))
    (folder / "unlabelled.png").write_bytes((folder / "circle_000.png").read_bytes())
    (folder / "unlabelled.json").write_text(json.dumps({"caption": "something else"}))
    out = root / "data"
    run_ingest(from_dict(IngestConfig, {
        "sources": [{"name": "folder", "path": str(folder)}], "output": str(out), "executor": "local",
        "dedup": {"exact": False, "near": False},
        "process": {"min_side": 8, "image_format": "png", "buckets": {"base_resolution": 32, "multiple": 16}}}))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset, classifier dir, CLI stdout): trained once through the `tessera train-classifier` command."""
    import contextlib
    import io

    from tessera.cli import main

    root = tmp_path_factory.mktemp("clf")
    data = shapes_dataset(root, per_class=60, label_in_json=True)
    out = root / "classifier"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = main(["train-classifier", "--data", str(data), "--out", str(out), "--epochs", "8",
                         "--holdout", "0.2", "--prompt-template", "a drawing of a {label}"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return data, out, buf.getvalue()


def test_trained_classifier_recognises_held_out_real_images(trained):
    _, out, stdout = trained
    info = json.loads((out / "config.json").read_text())
    assert info["arch"] == "tessera-cnn-v1" and info["labels"] == sorted(SHAPES) and info["image_size"] == 32
    assert info["holdout_accuracy"] >= 0.85 and info["holdout_images"] >= 20, info
    assert set(info["holdout_per_class"]) == set(SHAPES)
    assert info["train"]["skipped"] == {"unlabelled": 1, "decode_error": 0}  # counted, not silent
    assert info["prompt_template"] == "a drawing of a {label}"
    assert (out / "model.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # safetensors, not a zip pickle
    assert "held-out accuracy" in stdout and "model.safetensors" in stdout


def test_held_out_images_are_never_trained_on_and_their_accuracy_is_what_the_config_says(trained):
    data, out, _ = trained
    split, info = json.loads((out / "split.json").read_text()), json.loads((out / "config.json").read_text())
    assert not set(split["train"]) & set(split["holdout"])  # disjoint
    assert len(split["train"]) == info["train_images"] and len(split["holdout"]) == info["holdout_images"]
    # An independent evaluation: the held-out keys' images and labels read afresh, scored by the saved weights.
    keys, images, labels, _ = read_labelled(str(data))
    assert sorted(split["train"] + split["holdout"]) == sorted(keys)  # every labelled image on one side
    clf, held = load_classifier(str(out)), [i for i, k in enumerate(keys) if k in set(split["holdout"])]
    pred = clf.predict_tensors([images[i] for i in held])
    right = sum(clf.labels[p] == labels[i] for p, i in zip(pred, held))
    assert info["holdout_accuracy"] == pytest.approx(right / len(held), abs=1e-12)


def test_loaded_classifier_api_for_rewards(trained):
    _, out, _ = trained
    clf = load_classifier(str(out))
    assert isinstance(clf, ImageClassifier) and clf.labels == sorted(SHAPES) and clf.image_size == 32
    rng = random.Random(5)
    images = [draw_shape(s, rng) for s in SHAPES for _ in range(6)]
    expected = [clf.labels.index(s) for s in SHAPES for _ in range(6)]
    pred = clf.predict(images)
    assert sum(p == e for p, e in zip(pred, expected)) >= 0.8 * len(images)

    x = torch.stack([pil_to_tensor(im) for im in images]).requires_grad_(True)  # (18, 3, 32, 32) in [-1, 1]
    logits = clf.predict_logits(x)
    assert logits.shape == (18, 3) and logits.argmax(-1).tolist() == pred
    logits[torch.arange(18), torch.tensor(expected)].sum().backward()  # differentiable in the pixels
    assert x.grad is not None and x.grad.abs().sum() > 0
    big = torch.nn.functional.interpolate(x.detach(), size=(48, 64), mode="nearest")  # any H x W is resized inside
    assert clf.predict_logits(big).shape == (18, 3)
    again = load_classifier(str(out))
    assert torch.equal(again.predict_logits(x.detach()), clf.predict_logits(x.detach()))


def test_labels_from_a_caption_template_and_clear_errors(tmp_path):
    data = shapes_dataset(tmp_path, per_class=3, label_in_json=False)
    keys, images, labels, skipped = read_labelled(str(data), template="a drawing of a {label}")
    assert sorted(set(labels)) == sorted(SHAPES) and len(keys) == 9 and skipped["unlabelled"] == 1
    assert images[0].shape == (3, 32, 32) and -1.0 <= float(images[0].min()) <= float(images[0].max()) <= 1.0
    with pytest.raises(ValueError, match=r"no labelled samples.*'label'"):
        read_labelled(str(data))
    with pytest.raises(ValueError, match="exactly once"):
        read_labelled(str(data), template="a drawing")
    with pytest.raises(FileNotFoundError, match="no classifier config") as e:
        load_classifier(str(tmp_path / "nowhere"))
    named = re.search(r"`tessera ([^`]+)`", str(e.value)).group(1).split()
    from tessera.cli import build_parser

    with pytest.raises(SystemExit) as ok:  # the command the message names exists: its --help exits 0
        build_parser().parse_args([*named, "--help"])
    assert ok.value.code == 0
