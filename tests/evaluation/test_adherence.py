"""Prompt adherence on known inputs: classifier accuracy (expected label from the prompt template, per class,
confusion matrix, unscored prompts counted) and colour adherence (dominant foreground colour, background left out,
prompts without a colour not scored), on real drawings and real emoji glyphs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from tessera.evaluation.adherence import classifier_accuracy, colour_adherence, label_prompts, prompt_labels
from tessera.evaluation.classifier import ClassifierInfo, ImageClassifier

RGB = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220)}


class MeanColour(nn.Module):
    """A judge with known answers: the logits are the image's mean R, G and B."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(2, 3))  # (B, 3)


def judge() -> ImageClassifier:
    info = ClassifierInfo(labels=["red", "green", "blue"], prompt_template="a {label} thing", holdout_accuracy=0.97)
    return ImageClassifier(MeanColour(), info)


def disc(colour: str, background=(255, 255, 255), size: int = 32) -> Image.Image:
    """A filled disc of ``colour`` on a plain background (the background fills the border)."""
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).ellipse([8, 8, size - 8, size - 8], fill=RGB[colour])
    return img


def test_prompt_labels_follow_the_template():
    labels = ["red", "green", "blue"]
    assert label_prompts(labels, "a {label} thing") == ["a red thing", "a green thing", "a blue thing"]
    assert prompt_labels(["a Blue thing", "a purple thing", "something else", "a red thing"], labels,
                         "a {label} thing") == [2, None, None, 0]


def test_classifier_accuracy_per_class_and_confusion_on_known_images():
    clf = judge()
    # Images of the prompted colour, except two "green" prompts that got blue images; one prompt names no label.
    shown = ["red", "red", "green", "blue", "blue", "blue", "blue", "red"]
    prompts = ["a red thing"] * 2 + ["a green thing"] * 3 + ["a blue thing"] * 2 + ["a landscape"]
    images = [Image.new("RGB", (24, 16), RGB[c]) for c in shown]  # any size: resized inside
    rep = classifier_accuracy(clf, images, prompts)
    assert rep["n"] == 7 and rep["unscored"] == 1 and rep["accuracy"] == pytest.approx(5 / 7)
    assert rep["per_class"] == {"red": 1.0, "green": pytest.approx(1 / 3), "blue": 1.0}
    assert rep["confusion"] == [[2, 0, 0], [0, 1, 2], [0, 0, 2]]  # rows: prompted, columns: predicted
    assert rep["holdout_accuracy"] == 0.97 and rep["labels"] == ["red", "green", "blue"]
    assert rep["per_image"][3] == {"classifier_correct": 0.0, "classifier_label": "blue"}
    assert rep["per_image"][7] == {}


def test_colour_adherence_uses_the_foreground_colour():
    images = [disc("red"), disc("blue"), disc("green", background=(30, 60, 220)), disc("red"), disc("blue")]
    prompts = ["a red ball", "a red ball", "a green apple", "a plain circle", "a navy button"]
    rep = colour_adherence(images, prompts)
    # The blue disc under "red" misses; the green disc on a blue background is green (background left out);
    # "navy" means blue; a prompt without a colour word is not scored.
    assert rep["n"] == 4 and rep["unscored"] == 1 and rep["accuracy"] == pytest.approx(3 / 4)
    assert rep["per_colour"] == {"blue": 1.0, "green": 1.0, "red": 0.5}
    assert rep["confusion"] == {"blue": {"blue": 1}, "green": {"green": 1}, "red": {"blue": 1, "red": 1}}
    assert rep["per_image"][1] == {"colour_correct": 0.0, "dominant_colour": "blue"} and rep["per_image"][3] == {}
    assert colour_adherence(images[:1], ["a ball"])["accuracy"] is None  # nothing to score


def test_colour_adherence_on_real_emoji():
    from tests.evaluation.conftest import EMOJI_FONT
    from PIL import ImageFont

    font = ImageFont.truetype(str(EMOJI_FONT), 109)

    def glyph(ch: str) -> Image.Image:
        img = Image.new("RGB", (136, 128), "white")
        ImageDraw.Draw(img).text((0, 0), ch, font=font, embedded_color=True)
        return img.resize((32, 32), Image.LANCZOS)

    hearts = {"red": "\u2764\ufe0f", "yellow": "\U0001F49B", "green": "\U0001F49A", "blue": "\U0001F499",
              "purple": "\U0001F49C"}
    images = [glyph(ch) for ch in hearts.values()]
    right = colour_adherence(images, [f"a {c} heart emoji" for c in hearts])
    assert right["accuracy"] == 1.0, right["confusion"]
    wrong = colour_adherence(images, [f"a {c} heart emoji" for c in list(hearts)[1:] + list(hearts)[:1]])
    assert wrong["accuracy"] == 0.0


def test_per_image_rows_stay_with_their_images_around_unscored_prompts():
    # Unscored prompts first, in the middle and last: every row must describe its own image.
    shown = ["green", "red", "blue", "blue", "green", "red"]
    prompts = ["a landscape", "a red thing", "a blue thing", "nothing here", "a blue thing", "a portrait"]
    rep = classifier_accuracy(judge(), [Image.new("RGB", (16, 16), RGB[c]) for c in shown], prompts)
    want = [{}, {"classifier_correct": 1.0, "classifier_label": "red"},
            {"classifier_correct": 1.0, "classifier_label": "blue"}, {},
            {"classifier_correct": 0.0, "classifier_label": "green"}, {}]
    assert rep["per_image"] == want and (rep["n"], rep["unscored"]) == (3, 3)
    rep = colour_adherence([disc(c) for c in shown], ["a round thing", "a red ball", "a plain ball", "a blue ball",
                                                      "a red ball", "a ball"])
    assert rep["per_image"] == [{}, {"colour_correct": 1.0, "dominant_colour": "red"}, {},
                                {"colour_correct": 1.0, "dominant_colour": "blue"},
                                {"colour_correct": 0.0, "dominant_colour": "green"}, {}]
