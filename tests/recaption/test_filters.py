"""Caption filters on crafted captions: refusals, loops, empty, boilerplate, truncation, and lengths measured in
MiniLM's own tokens (the offline all-MiniLM-L6-v2 tokenizer), with the verdicts expected."""

from __future__ import annotations

import pytest

from tessera.config import from_dict
from tessera.recaption.config import FilterConfig
from tessera.recaption.filters import CaptionFilter, compression_ratio, has_loop

WORDS = ("red green blue yellow cat dog house tree car boat river mountain city street window door table chair "
         "flower garden bird horse sky cloud sun moon road bridge lamp book cup hat shoe coat").split()


@pytest.fixture(scope="module")
def flt() -> CaptionFilter:
    """The default filters, lengths in MiniLM tokens (max 30: MiniLM's 32 minus [CLS] and [SEP])."""
    return CaptionFilter(FilterConfig())


def verdicts(flt: CaptionFilter, texts: list[str], finish: str = "stop") -> list[str]:
    return [c.verdict for c in flt.check(texts, [finish] * len(texts))]


def test_crafted_captions_get_the_expected_verdicts(flt):
    texts = ["A red heart on a white background.",
             "I'm sorry, but I can't help with identifying people in images.",
             "I cannot describe this image.",
             "As an AI, I do not see images.",
             "",
             "   ",
             "a red car a red car a red car a red car",
             "the the the the the the the the the the the the the the the the the the the the",
             "a cat",
             "A yellow smiling face with open eyes."]
    assert verdicts(flt, texts) == ["ok", "refusal", "refusal", "refusal", "empty", "empty", "repetition",
                                    "repetition", "too_short", "ok"]
    assert verdicts(flt, ["A long caption that was cut off in the middle of a"], "length") == ["truncated"]


def test_boilerplate_openers_are_stripped_and_recorded(flt):
    [c] = flt.check(["The image shows a red apple on a wooden table."], ["stop"])
    assert (c.text, c.stripped, c.verdict) == ("a red apple on a wooden table.", "The image shows", "ok")
    [c] = flt.check(['"In this image, a dog runs across a green field."'], ["stop"])
    assert (c.text, c.stripped) == ("a dog runs across a green field.", "In this image")
    [c] = flt.check(["A photo of a dog on a beach at sunset."], ["stop"])  # a style, not boilerplate: kept
    assert c.stripped is None and c.text == "A photo of a dog on a beach at sunset."
    [c] = flt.check(["The image shows"], ["stop"])  # nothing after the opener: not stripped to empty
    assert c.text == "The image shows"


def test_over_length_is_measured_in_minilm_tokens(flt):
    from transformers import AutoTokenizer

    from tessera.trainer.text_encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    words = [w for w in WORDS if len(tok.tokenize(w)) == 1]
    thirty, thirty_one = " ".join(words[:30]), " ".join(words[:31])
    assert len(tok(thirty, add_special_tokens=False)["input_ids"]) == 30  # the target encoder's own count
    assert [c.text_tokens for c in flt.check([thirty, thirty_one], ["stop"] * 2)] == [30, 31]
    assert verdicts(flt, [thirty, thirty_one]) == ["ok", "too_long"]
    # Sub-word pieces count: 'emoji' is 3 MiniLM tokens, so a word count would under-measure.
    [c] = flt.check(["a yellow heart emoji"], ["stop"])
    assert c.text_tokens == len(tok.tokenize("a yellow heart emoji")) == 6


def test_limits_are_configurable_and_reject_lists_what_drops():
    short = CaptionFilter(from_dict(FilterConfig, {"max_tokens": 5, "reject": ["refusal"]}, "test"))
    [c] = short.check(["a red apple on a wooden kitchen table"], ["stop"])
    assert c.verdict == "too_long" and not short.rejects(c.verdict)  # recorded, kept
    assert short.rejects("refusal") and short.rejects("empty")  # an empty caption is never written
    with pytest.raises(Exception, match="unknown verdict"):
        from_dict(FilterConfig, {"reject": ["bad"]}, "test")


def test_repetition_measures():
    prose = "A small white cat sleeps on a sunny windowsill next to a pot of red flowers."
    assert compression_ratio(prose) < 1.5 < compression_ratio("a cat " * 30)
    assert has_loop("a red car a red car a red car", repeats=3, min_words=6)
    assert not has_loop("a very very very tall tree", repeats=3, min_words=6)  # 3 words: emphasis, not a loop
    assert not has_loop(prose, repeats=3, min_words=6)
