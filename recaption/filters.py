"""Caption quality checks: every caption gets a verdict, recorded in its provenance; rejected ones are retried once.

Order (the first that applies is the verdict): ``empty`` (no text, or no token of the target encoder) ->
``refusal`` ("I'm sorry", "I cannot", near the start) -> ``truncated`` (generation hit ``max_new_tokens``: finish
reason "length") -> ``repetition`` (zlib compression ratio above 2.4, or an n-gram said ``loop_repeats`` times
back to back) -> ``too_short`` / ``too_long`` in the target text encoder's tokens, counted with that encoder's own
tokenizer (a caption cut at MiniLM's 32 or T5's 120/300 tokens is measured, not guessed). Boilerplate openers
("The image shows") are stripped first, not rejected; what was stripped is recorded.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from tessera.data_pipeline.inspect_verify import token_counter
from tessera.recaption.config import FilterConfig

_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_WORD = re.compile(r"[\w']+")


@dataclass
class Checked:
    """A caption after cleaning and checking."""

    text: str  # cleaned caption (opener stripped, whitespace and quotes trimmed)
    verdict: str  # one of config.VERDICTS
    text_tokens: int  # length in the target text encoder's tokens (special tokens excluded)
    stripped: str | None  # the boilerplate opener removed, if any


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes: about 1 for prose, above 2.4 for text that repeats itself."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def has_loop(text: str, repeats: int, min_words: int) -> bool:
    """Whether some word n-gram occurs ``repeats`` times back to back over at least ``min_words`` words."""
    words = _WORD.findall(text.lower())
    for n in range(1, len(words) // repeats + 1):
        if n * repeats < min_words:
            continue
        for i in range(len(words) - n * repeats + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


class CaptionFilter:
    """The configured checks, with the target encoder's tokenizer loaded once."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self.count = token_counter(cfg.tokenizer)
        openers = sorted(cfg.openers, key=len, reverse=True)  # longest first: "this image shows" before "this image"
        self._opener = re.compile(r"^(?:" + "|".join(re.escape(o) for o in openers) + r")[\s,:;.-]*", re.I) \
            if openers else None
        self._refusals = [r.lower() for r in cfg.refusals]

    def clean(self, text: str) -> tuple[str, str | None]:
        """Whitespace and quotes trimmed, a boilerplate opener stripped: (caption, the opener or None)."""
        text = " ".join(text.split()).strip(_QUOTES + " ")
        m = self._opener.match(text) if self._opener else None
        if m is None or m.end() == len(text):
            return text, None
        return text[m.end():].strip(_QUOTES + " "), m.group(0).rstrip(" ,:;.-")

    def verdict(self, text: str, finish_reason: str, text_tokens: int) -> str:
        """The first check that fails, or ``ok``."""
        cfg = self.cfg
        if not text.strip() or text_tokens == 0:  # no token for the text encoder to read is empty too
            return "empty"
        head = text[:80].lower().replace("\u2019", "'")
        if any(r in head for r in self._refusals):
            return "refusal"
        if finish_reason == "length":
            return "truncated"
        if compression_ratio(text) > cfg.max_compression_ratio or has_loop(text, cfg.loop_repeats, cfg.loop_min_words):
            return "repetition"
        if text_tokens < cfg.min_tokens:
            return "too_short"
        if text_tokens > cfg.max_tokens:
            return "too_long"
        return "ok"

    def check(self, texts: list[str], finish_reasons: list[str]) -> list[Checked]:
        """Clean and check a batch of captions (one tokenizer call)."""
        cleaned = [self.clean(t) for t in texts]
        lengths = self.count([c for c, _ in cleaned])
        return [Checked(c, self.verdict(c, fr, n), n, s) for (c, s), fr, n in zip(cleaned, finish_reasons, lengths)]

    def rejects(self, verdict: str) -> bool:
        """Whether a verdict drops the caption (after its one retry); an empty caption is never written."""
        return verdict == "empty" or verdict in self.cfg.reject
