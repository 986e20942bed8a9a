"""Plugins: a distribution adds a registry member through an entry point, and configs name it like a built-in.

The plugin is a real distribution, installed by pip (into a --target directory on PYTHONPATH, so the test venv
itself is left as it was); importlib.metadata finds its entry point there, as it would in site-packages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tessera.registry import Registry, RegistryError
from tests import wandb_records
from tests.trainer import helpers as H

PLUGIN = textwrap.dedent('''
    """A tiny denoiser family for Tessera: conv in, time and pooled text added, conv out."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from tessera.trainer.models.registry import ModelFamily


    @dataclass(kw_only=True)
    class TinyConvConfig:
        in_channels: int = 3
        text_dim: int = 32
        hidden: int = 8


    class TinyConv(nn.Module):
        family = "tiny_conv"

        def __init__(self, config: TinyConvConfig) -> None:
            super().__init__()
            self.config = config
            self.inp = nn.Conv2d(config.in_channels, config.hidden, 3, padding=1)
            self.text = nn.Linear(config.text_dim, config.hidden)
            self.time = nn.Linear(1, config.hidden)
            self.out = nn.Conv2d(config.hidden, config.in_channels, 3, padding=1)

        def set_gradient_checkpointing(self, on: bool) -> None:
            pass

        def forward(self, x, t, text, text_mask, pooled=None):
            mask = text_mask.to(text.dtype).unsqueeze(-1)
            pooled_text = (text * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N, Dt)
            h = self.inp(x) + (self.text(pooled_text) + self.time(t.to(x.dtype)[:, None]))[:, :, None, None]
            return self.out(torch.nn.functional.silu(h))


    FAMILY = ModelFamily(TinyConvConfig, TinyConv, lambda m, h, w, L: 2 * h * w * m.config.hidden * 9 * 6)
''')

PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["setuptools"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "tessera-tiny-plugin"
    version = "0.1.0"

    [tool.setuptools]
    py-modules = ["tessera_tiny_plugin", "tessera_broken_plugin"]

    [project.entry-points."tessera.models"]
    tiny_conv = "tessera_tiny_plugin:FAMILY"
    broken = "tessera_broken_plugin:FAMILY"
''')


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The plugin distribution, pip-installed into a directory that goes on PYTHONPATH."""
    src, target = tmp_path_factory.mktemp("plugin-src"), tmp_path_factory.mktemp("plugin-site")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "tessera_tiny_plugin.py").write_text(PLUGIN)
    (src / "tessera_broken_plugin.py").write_text("import a_module_nobody_installed\n")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return target


def test_a_plugin_model_trains_by_name_with_tessera_train_and_w_and_b_links_its_dataset_and_checkpoint(
        plugin_path, tmp_path):
    data = H.tiny_dataset(tmp_path / "data", shards=1, per_shard=8).root
    enc = H.tiny_text_encoder(tmp_path / "t5")
    ovs = H.overrides(tmp_path, "plug", data, enc, **{"model.name": "tiny_conv", "model.dit": "null",
                                                       "model.options": "{hidden: 8}", "train.total_samples": 8,
                                                       "tracking.mode": "offline"})
    out = H.run_train(ovs, PYTHONPATH=f"{plugin_path}:{H.ROOT}")
    H.check(out)
    run_dir = tmp_path / "runs" / "plug"
    assert [r["step"] for r in H.metrics(run_dir)] == [1, 2]
    assert "name: tiny_conv" in next(run_dir.glob("checkpoints/step_*/config.yaml")).read_text()
    # W&B: the dataset is this run's input and the checkpoint its output, both by reference.
    arts = {a.type: a for a in (r.artifact for r in wandb_records.records(run_dir)
                                if r.WhichOneof("record_type") == "artifact")}
    (run,) = {r.run.run_id for r in wandb_records.records(run_dir) if r.WhichOneof("record_type") == "run"}
    assert arts["dataset"].use_after_commit and json.loads(arts["dataset"].metadata)["uri"] == Path(data).as_uri()
    assert arts["model"].name == f"model-{run}" and "step-2" in arts["model"].aliases
    assert {e.path.split("/", 1)[0] for e in arts["model"].manifest.contents} == {"model"}


def test_a_plugin_that_fails_to_import_is_an_error_naming_it_and_its_group(plugin_path):
    code = textwrap.dedent("""
        from tessera.trainer.models.registry import MODELS
        try:
            MODELS.get("broken")
        except Exception as e:
            print(type(e).__name__, e)
        print("names", MODELS.names())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=H.env(PYTHONPATH=f"{plugin_path}:{H.ROOT}"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RegistryError model plugin 'broken' (distribution tessera-tiny-plugin) from entry-point group " \
           "'tessera.models' failed to import 'tessera_broken_plugin:FAMILY': ModuleNotFoundError" in out.stdout
    assert "names ['broken', 'dit', 'mmdit', 'tiny_conv', 'unet']" in out.stdout  # listed, not imported


def test_unknown_names_point_at_the_entry_point_group():
    reg: Registry[int] = Registry("sampler")
    reg.register("euler")(1)
    with pytest.raises(RegistryError, match=r"unknown sampler 'eulr'; did you mean 'euler'\?.*'tessera.samplers'"):
        reg.get("eulr")


def test_a_plugin_models_section_is_checked_strictly_and_options_belong_to_plugins(plugin_path, monkeypatch):
    from tessera.config import ConfigError, load_config
    from tessera.trainer.config import ModelConfig

    monkeypatch.syspath_prepend(str(plugin_path))  # importlib.metadata finds the distribution on sys.path
    cfg = load_config(ModelConfig, None, ["name=tiny_conv", "options={hidden: 4}"])
    assert type(cfg.section()).__name__ == "TinyConvConfig" and cfg.section().hidden == 4
    with pytest.raises(ConfigError, match=r"unknown key 'bogus' in TinyConvConfig"):
        load_config(ModelConfig, None, ["name=tiny_conv", "options={hidden: 4, bogus: 1}"])
    with pytest.raises(ConfigError, match=r"section\(s\) options set but model.name is 'dit'"):
        load_config(ModelConfig, None, ["name=dit", "options={hidden: 4}"])
