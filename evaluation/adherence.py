"""Prompt adherence of generated images: classifier accuracy and colour adherence.

* **Classifier accuracy** (Classification Accuracy Score / GAN-test, Ravuri & Vinyals 2019): each prompt made from
  a label by the classifier's template ("a photo of a {label}") expects that label; the share of images the
  classifier (``evaluation/classifier.py``) assigns to it, overall and per class, with the confusion matrix
  (rows: prompted label, columns: predicted). Prompts that name no label are counted, not scored.
* **Colour adherence** (weight-free, like GenEval's colour task): for prompts that name a basic colour
  (``colour.colour_words``), the share of images whose dominant foreground colour (``colour.dominant_colours``:
  background left out, the 11 basic colour terms) is one the prompt names. Prompts naming no colour are not
  scored; the confusion is (named colour -> dominant colour).
"""

from __future__ import annotations

from PIL import Image

from tessera.evaluation.classifier import ImageClassifier, accuracy_report, template_regex
from tessera.evaluation.colour import NAMES, colour_words, dominant_colours


def prompt_labels(prompts: list[str], labels: list[str], template: str) -> list[int | None]:
    """The label index each prompt asks for (its template match), or None when it names no known label."""
    pattern, index = template_regex(template), {lab.lower(): i for i, lab in enumerate(labels)}
    out: list[int | None] = []
    for p in prompts:
        m = pattern.match(p.strip())
        out.append(index.get(m.group("label").lower()) if m else None)
    return out


def label_prompts(labels: list[str], template: str) -> list[str]:
    """One prompt per label, e.g. "a photo of a cat"."""
    return [template.format(label=lab) for lab in labels]


def classifier_accuracy(clf: ImageClassifier, images: list[Image.Image], prompts: list[str]) -> dict:
    """Accuracy of ``clf`` on generated images against the label each prompt names (per image: its prompt)."""
    expected = prompt_labels(prompts, clf.labels, clf.info.prompt_template)
    scored = [i for i, e in enumerate(expected) if e is not None]
    pred = clf.predict([images[i] for i in scored]) if scored else []
    rep = accuracy_report(pred, [expected[i] for i in scored], clf.labels)
    per_image: list[dict] = [{} for _ in images]
    for i, p in zip(scored, pred):
        per_image[i] = {"classifier_correct": float(p == expected[i]), "classifier_label": clf.labels[p]}
    rep.update(unscored=len(images) - len(scored), holdout_accuracy=clf.info.holdout_accuracy, per_image=per_image)
    return rep


def colour_adherence(images: list[Image.Image], prompts: list[str], min_share: float = 0.0) -> dict:
    """Share of colour-naming prompts' images whose dominant foreground colour is one the prompt names."""
    hits, n, per_colour, confusion = 0, 0, {}, {}
    per_image: list[dict] = []
    for img, prompt in zip(images, prompts):
        named = colour_words(prompt)
        if not named:
            per_image.append({})
            continue
        top = dominant_colours(img, k=1, min_share=min_share)
        got = top[0][0] if top else "none"  # "none": all background
        ok = got in named
        hits, n = hits + ok, n + 1
        first = named[0]
        c = per_colour.setdefault(first, [0, 0])
        c[0], c[1] = c[0] + ok, c[1] + 1
        row = confusion.setdefault(first, {})
        row[got] = row.get(got, 0) + 1
        per_image.append({"colour_correct": float(ok), "dominant_colour": got})
    return {"accuracy": hits / n if n else None, "n": n, "unscored": len(images) - n,
            "per_colour": {k: v[0] / v[1] for k, v in sorted(per_colour.items())},
            "confusion": {k: dict(sorted(v.items())) for k, v in sorted(confusion.items())},
            "colours": NAMES, "per_image": per_image}
