"""``tessera data recaption`` through the one console entry point, with the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.cli import main

CONFIGS = Path(__file__).parents[2] / "configs"


def test_recaption_joins_the_data_group(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "recaption" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["recaption/attributes.yaml", "recaption/qwen2vl.yaml", "quickstart/recaption.yaml"])
def test_shipped_configs_resolve(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "recaption", "--config", str(CONFIGS / name), "--dry-run", "batch_size=3"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("# config_hash: ") and "batch_size: 3" in out and "captioners:" in out


def test_typo_is_a_usage_error_naming_the_key(capsys):
    assert main(["data", "recaption", "--config", str(CONFIGS / "recaption/attributes.yaml"), "batchsize=3"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err


def test_attributes_config_runs_end_to_end(emoji_ds, tmp_path, capsys):
    out = tmp_path / "rc"
    code = main(["data", "recaption", "--config", str(CONFIGS / "recaption/attributes.yaml"), f"source={emoji_ds}",
                 f"output={out}", "executor=local"])
    assert code == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    n = m["totals"]["written"]
    assert f"recaptioned {n} samples in 3 shards -> {out}" in printed
    assert f"attributes: {m['recaption']['variants']['attributes']['written']} written" in printed
