"""The shipped fine-tuning configs load strictly, each selects its method with the published knobs, and bad
settings are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.config import ConfigError, load_config
from tessera.finetune.config import FinetuneJobConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"


@pytest.mark.parametrize("method", ["ddpo", "grpo", "dpo", "draft"])
def test_shipped_configs_load_strictly_and_select_their_method(method):
    cfg = load_config(FinetuneJobConfig, CONFIGS / f"{method}.yaml")
    assert cfg.method.name == method and cfg.checkpoint
    # LoRA, except reward backprop and GRPO: on the labelled digits task (docs/finetune.md, "Which method") an
    # adapter fooled the reward classifier without moving the independent judge; full fine-tuning moved it.
    assert cfg.lora.enabled == (method not in ("draft", "grpo"))
    assert cfg.eval.prompts.load() and not set(cfg.eval.prompts.load()) & set(cfg.prompts.load())  # held out
    cfg.check()
    if method == "grpo":
        assert cfg.method.grpo.kl_beta == 0.04 and cfg.rollout.noise_level == 1.0 and cfg.train.updates == 70
        assert cfg.rollout.group_noise and cfg.rollout.sde_window == [0, 3]
    if method == "dpo":
        assert 2500 <= cfg.method.dpo.beta <= 5000


def test_unknown_keys_and_bad_values_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match="kl_betta"):
        load_config(FinetuneJobConfig, CONFIGS / "grpo.yaml", ["method.grpo.kl_betta=0.1"])
    with pytest.raises(ValueError, match="sde_window"):
        load_config(FinetuneJobConfig, CONFIGS / "grpo.yaml", ["rollout.sde_window=[3, 99]"])
    cfg = load_config(FinetuneJobConfig, CONFIGS / "ddpo.yaml", ["checkpoint="])
    with pytest.raises(ConfigError, match="checkpoint is required"):
        cfg.check()
    cfg = load_config(FinetuneJobConfig, CONFIGS / "ddpo.yaml", ["deepspeed.stage=3"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        cfg.check()
