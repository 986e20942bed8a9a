"""Prompt sets for evaluation suites: txt, CSV/TSV, COCO captions JSON, parquet, and a built-in set.

Every loader returns the prompts in file order; ``load_prompts`` then takes a seeded subset. The
subset is the first ``limit`` entries of one seeded permutation, restored to file order, so a
smaller limit with the same seed is always a subset of a larger one (suites can grow without
changing the images already generated).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

BUILTIN = "builtin"
BUILTIN_PATH = Path(str(importlib.resources.files("tessera.evaluation").joinpath("prompts_builtin.txt")))


class PromptError(ValueError):
    """A prompt file that cannot be read; the message names the file and the line or column."""


@dataclass(kw_only=True)
class PromptSetConfig:
    """Where the prompts come from and which subset of them a suite uses."""

    path: str = BUILTIN  # "builtin" or a .txt/.csv/.tsv/.json/.parquet file
    column: str = "prompt"  # CSV/TSV/parquet column holding the prompt
    limit: int | None = None  # keep this many prompts (seeded subset); None = all
    seed: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")


def _read_txt(path: Path, text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _read_delimited(path: Path, text: str, column: str, delimiter: str) -> list[str]:
    """CSV/TSV with a header row; ``column`` names the prompt column."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise PromptError(f"{path}: empty file, expected a header row with a {column!r} column") from None
    header = [h.strip() for h in header]
    if column not in header:
        raise PromptError(f"{path}: line 1: no column {column!r} in header (columns: {', '.join(header)})")
    idx = header.index(column)
    out = []
    for row in reader:
        if not row or not any(c.strip() for c in row):
            continue
        if idx >= len(row):
            raise PromptError(f"{path}: line {reader.line_num}: row has {len(row)} fields, "
                              f"column {column!r} is field {idx + 1}")
        prompt = row[idx].strip()
        if not prompt:
            raise PromptError(f"{path}: line {reader.line_num}: empty prompt in column {column!r}")
        out.append(prompt)
    return out


def _read_coco(path: Path, text: str) -> list[str]:
    """COCO captions (captions_val2014 format), ordered by (image_id, id) for determinism."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise PromptError(f"{path}: expected COCO captions JSON with an 'annotations' list")
    rows = []
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise PromptError(f"{path}: annotations[{i}]: expected an object with a string 'caption'")
        rows.append((a.get("image_id", 0), a.get("id", i), a["caption"].strip()))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows if r[2]]


def _read_parquet(path: Path, column: str) -> list[str]:
    """A parquet file with a string column ``column``."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if column not in schema.names:
        raise PromptError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise PromptError(f"{path}: row {i}: column {column!r} holds {v!r}, expected a non-empty string")
        out.append(v.strip())
    return out


def read_prompt_file(path: str | Path, column: str = "prompt") -> list[str]:
    """All prompts of a file (or the built-in set), in file order, format chosen by suffix."""
    if str(path) == BUILTIN:
        path = BUILTIN_PATH
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        prompts = _read_parquet(path, column)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"{path}: not UTF-8 text (byte {e.start})") from None
        if suffix == ".txt":
            prompts = _read_txt(path, text)
        elif suffix in (".csv", ".tsv"):
            prompts = _read_delimited(path, text, column, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".json":
            prompts = _read_coco(path, text)
        else:
            raise PromptError(f"{path}: unknown prompt file type {suffix!r} "
                              "(expected .txt, .csv, .tsv, .json (COCO captions) or .parquet)")
    if not prompts:
        raise PromptError(f"{path}: no prompts found")
    return prompts


def select_subset(prompts: list[str], limit: int | None, seed: int) -> list[str]:
    """First ``limit`` of a seeded permutation, in file order; nested across limits for one seed."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in sorted(order[:limit])]


def load_prompts(path: str | Path = BUILTIN, *, column: str = "prompt", limit: int | None = None,
                 seed: int = 0) -> list[str]:
    """Load a prompt set (``"builtin"`` or a file) and take a seeded subset of ``limit`` prompts."""
    return select_subset(read_prompt_file(path, column), limit, seed)


def load_prompt_set(cfg: PromptSetConfig) -> list[str]:
    """``load_prompts`` driven by a ``PromptSetConfig``."""
    return load_prompts(cfg.path, column=cfg.column, limit=cfg.limit, seed=cfg.seed)


def prompts_sha256(prompts: list[str]) -> str:
    """Content hash of an ordered prompt list, for metrics.json."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
