"""Prompt sets: formats, seeded subsets, error messages."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.evaluation.prompts import (PromptError, PromptSetConfig, load_prompt_set, load_prompts,
                                prompts_sha256, select_subset)


def test_builtin_set_has_64_distinct_prompts():
    prompts = load_prompts("builtin")
    assert len(prompts) == 64
    assert len(set(prompts)) == 64
    assert any("emoji" in p for p in prompts) and any("clip art" in p or "clip-art" in p for p in prompts)
    assert not any(p.startswith("#") for p in prompts)


def test_txt_skips_blank_lines_and_comments(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\n a cat \n\n   \n# another\na dog\n", encoding="utf-8")
    assert load_prompts(p) == ["a cat", "a dog"]


def test_csv_and_tsv_with_configurable_column(tmp_path):
    c = tmp_path / "p.csv"
    c.write_text('id,text\n1,"a cat, sitting"\n2,a dog\n\n', encoding="utf-8")
    assert load_prompts(c, column="text") == ["a cat, sitting", "a dog"]
    t = tmp_path / "p.tsv"
    t.write_text("prompt\tid\nan owl\t1\na fox\t2\n", encoding="utf-8")
    assert load_prompts(t) == ["an owl", "a fox"]


def test_csv_errors_name_file_line_and_column(tmp_path):
    c = tmp_path / "bad.csv"
    c.write_text("id,caption\n1,x\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"bad\.csv: line 1: no column 'prompt'.*id, caption"):
        load_prompts(c)
    c.write_text("id,prompt\n1,a cat\n2\n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"bad\.csv: line 3: row has 1 fields"):
        load_prompts(c)
    c.write_text("id,prompt\n1,a cat\n2,  \n", encoding="utf-8")
    with pytest.raises(PromptError, match=r"bad\.csv: line 3: empty prompt"):
        load_prompts(c)


def test_coco_captions_json(tmp_path):
    data = {"images": [{"id": 7}], "annotations": [
        {"image_id": 9, "id": 2, "caption": "B second image"},
        {"image_id": 7, "id": 5, "caption": " A first image, caption two "},
        {"image_id": 7, "id": 1, "caption": "A first image, caption one"},
    ]}
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    assert load_prompts(p) == ["A first image, caption one", "A first image, caption two", "B second image"]


def test_coco_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"annotations": [\n{"caption": 3}]}', encoding="utf-8")
    with pytest.raises(PromptError, match=r"c\.json: annotations\[0\]"):
        load_prompts(p)
    p.write_text('{"annotations": \n [1,}', encoding="utf-8")
    with pytest.raises(PromptError, match=r"c\.json: line 2 column \d+: invalid JSON"):
        load_prompts(p)


def test_parquet(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["x", "y"], "prompt": ["a cat", "a dog"]}), p)
    assert load_prompts(p) == ["a cat", "a dog"]
    assert load_prompts(p, column="caption") == ["x", "y"]
    with pytest.raises(PromptError, match=r"p\.parquet: no column 'text'"):
        load_prompts(p, column="text")
    pq.write_table(pa.table({"prompt": ["ok", None]}), p)
    with pytest.raises(PromptError, match=r"p\.parquet: row 1: column 'prompt'"):
        load_prompts(p)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(PromptError, match=r"p\.xml: unknown prompt file type"):
        load_prompts(tmp_path / "p.xml")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_seeded_subset_is_deterministic_nested_and_ordered():
    full = load_prompts("builtin")
    a = load_prompts("builtin", limit=10, seed=3)
    assert a == load_prompts("builtin", limit=10, seed=3)
    assert a != load_prompts("builtin", limit=10, seed=4)
    assert set(a) <= set(load_prompts("builtin", limit=20, seed=3))  # growing a suite keeps old prompts
    assert a == [p for p in full if p in set(a)]  # file order kept
    assert select_subset(full, 1000, 0) == full


def test_config_and_hash():
    cfg = PromptSetConfig(limit=5, seed=1)
    prompts = load_prompt_set(cfg)
    assert len(prompts) == 5
    assert prompts_sha256(prompts) == prompts_sha256(list(prompts))
    assert prompts_sha256(prompts) != prompts_sha256(prompts[::-1])
    with pytest.raises(ValueError, match="limit"):
        PromptSetConfig(limit=0)
