"""``openclipart`` source: Debian's openclipart-png, captioned from directory and file name.

Caption rule (file names look like ``<title>_<author>_<NN>.png``, cut to 24 characters before the
``_NN`` id was appended, e.g. ``cavallo_architetto_franc_05.png``, ``the_moon_dan_gerhards_01.png``):
1. drop the trailing numeric id (``_01``, ``_01r``);
2. a name of exactly 24 characters was cut: its last token is dropped when it is the start of an
   author token ("architetto_franc", "anthony_lie"); other fragments ("transparen") stay;
3. split on ``_ - . space``; drop purely numeric tokens;
4. strip trailing author tokens (AUTHOR_TOKENS, collected from this package's file names; digits
   after a name are ignored: "ganson1"), and 1-2 letter initials right after an author token
   ("gerald_g", "leigh_purdie_r");
5. "bw" -> "black and white"; if nothing is left, the category names the image.
Caption: ``"clip art of <title>, <dir>, <parent dir>"`` (generic dirs like ``unsorted`` skipped).
"""

from __future__ import annotations

import os
import re
from typing import Iterator

from tessera.data_pipeline.sample import RawSample
from tessera.data_pipeline.sources import SOURCES, Partition, SourceConfig, require_debian_path

# Author name tokens that end openclipart-png file names (from a frequency count of trailing
# tokens over the 6,900 files). Only a *trailing* run of them is removed, so "park" in
# "park_bench" or "kim" inside a title is kept.
AUTHOR_TOKENS = frozenset(
    """architetto francesco rollandin ganson benji park nicu buculei jon phillips gerald jarno vasamaa
    vasamaa1 juliane krug linda kim jean victor balin dan gerhards yves guillou dave pena susan luiz
    araujo christoph brill nathan eady anthony liekens fudriot omic ch peterm mimooh mateya sergio
    lumen zazou joel nicolas jonathan graig ryan smith leigh purdie merzok matt todd jaim petri
    marcelo matthew jasper grond stefan bazelkov michael enrique frouke brice jonadab costea cedric
    donna meza montes romus celso erich patricia daniel frederic ashton toh goneri bouder utrescu
    tom webb jeff walden william page jesper zedlitz john rariden arjen meijer nurbldoff anton olivier
    aj jk""".split()
)
_GENERIC_DIRS = {"unsorted", "duplicates", "special", "examples", "png"}
_ID = re.compile(r"[_\-\s]+\d+[a-z]?$")
_CUT_LENGTH = 24  # openclipart-png cut titles to 24 characters before appending "_NN"


def _is_author(token: str) -> bool:
    return token.rstrip("0123456789") in AUTHOR_TOKENS


def clean_title(stem: str) -> str:
    """Title words of an openclipart file stem, without ids and author names (rule in module doc)."""
    name = _ID.sub("", stem.lower()).rstrip("_- ")
    tokens = [t for t in re.split(r"[_\-\s.]+", name) if t]
    if len(name) == _CUT_LENGTH and len(tokens) > 1 and any(a.startswith(tokens[-1]) for a in AUTHOR_TOKENS):
        tokens = tokens[:-1]
    tokens = [t for t in tokens if not t.isdigit()]

    while tokens:
        last = tokens[-1]
        if _is_author(last) or (len(last) <= 2 and len(tokens) > 1 and _is_author(tokens[-2])):
            tokens.pop()
        else:
            break
    return " ".join("black and white" if t == "bw" else t for t in tokens)


def category_of(rel: str) -> list[str]:
    """Directory names of a relative path, deepest first, generic ones skipped."""
    dirs = [d for d in os.path.dirname(rel).split("/") if d and d.lower() not in _GENERIC_DIRS]
    return [d.replace("_", " ").replace("-", " ").lower() for d in reversed(dirs)][:2]


def openclipart_caption(rel: str) -> str:
    """'food/fruit/melon_goneri_le_bouder_01.png' -> 'clip art of melon, fruit, food'."""
    title = clean_title(os.path.splitext(os.path.basename(rel))[0])
    cats = category_of(rel)
    if not title:
        return f"clip art of {cats[0]}" if cats else "clip art"
    return ", ".join([f"clip art of {title}", *cats])


class OpenclipartSource:
    """Every PNG of openclipart-png (optionally some top-level categories), sorted by path."""

    def __init__(self, cfg: SourceConfig) -> None:
        require_debian_path(cfg.path, "openclipart-png")
        self.cfg = cfg

    def listing(self) -> list[str]:
        """Sorted relative paths of the PNGs, filtered by ``categories`` and cut to ``limit``."""
        root, cats = self.cfg.path, self.cfg.section().categories
        found = []
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            top = rel_dir.split(os.sep)[0]
            if cats is not None and top not in cats:
                continue
            found += [os.path.normpath(os.path.join(rel_dir, f)) for f in files if f.lower().endswith(".png")]
        found.sort()
        if not found:
            raise FileNotFoundError(f"no PNG files under {root} (categories={cats})")
        return found[: self.cfg.limit] if self.cfg.limit is not None else found

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """Consecutive ranges of the sorted listing; payloads carry the file names."""
        if samples_per_partition < 1:
            raise ValueError(f"samples_per_partition must be >= 1, got {samples_per_partition}")
        items = self.listing()
        return [
            Partition("openclipart", i, {"files": items[s : s + samples_per_partition]})
            for i, s in enumerate(range(0, len(items), samples_per_partition))
        ]

    def read(self, part: Partition) -> Iterator[RawSample]:
        """Read each PNG with its cleaned caption."""
        for rel in part.payload["files"]:
            path = os.path.join(self.cfg.path, rel)
            sid = f"openclipart:{rel}"
            meta = {"path": path, "category": "/".join(os.path.dirname(rel).split(os.sep))}
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield RawSample("openclipart", sid, None, None, meta, "read_error", str(e))
                continue
            yield RawSample("openclipart", sid, data, openclipart_caption(rel), meta)


@SOURCES.register("openclipart")
def _build(cfg: SourceConfig) -> OpenclipartSource:
    return OpenclipartSource(cfg)
