"""``deepspeed.extra``: DeepSpeed keys merged over the generated config last, checked by DeepSpeed's own parser
when the config loads (so ``--dry-run`` catches them), never silently ignored."""

from __future__ import annotations

import pytest

from tessera.config import ConfigError, from_dict, load_config
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig, build_ds_config

NVME = {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True}


def _render(section: dict, **kw) -> dict:
    ds = from_dict(DeepSpeedConfig, section, "deepspeed")
    args = {"micro_batch": 4, "world_size": 8, "cuda": True, "bf16_ok": True, **kw}
    return build_ds_config(ds, OptimConfig(), **args)


def test_nvme_offload_renders_over_the_generated_zero3_config():
    out = _render({"stage": 3, "extra": {
        "zero_optimization": {"offload_param": NVME, "offload_optimizer": NVME, "stage3_max_live_parameters": 10**9},
        "aio": {"block_size": 1048576, "queue_depth": 8}}})
    zero = out["zero_optimization"]
    assert zero["offload_param"] == NVME and zero["offload_optimizer"] == NVME
    assert zero["stage3_max_live_parameters"] == 10**9 and out["aio"]["queue_depth"] == 8
    # the generated keys stay: the merge is deep, not a replacement of the section
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 50_000_000 and zero["contiguous_gradients"]
    assert out["train_batch_size"] == 32 and out["bf16"]["enabled"]


def test_fp16_for_gpus_without_bf16_replaces_the_chosen_precision():
    out = _render({"extra": {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}})
    assert out["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert out["bf16"]["enabled"] is False  # DeepSpeed refuses both at once


def test_dotted_overrides_reach_any_depth_and_deepspeed_checks_the_values():
    cfg = load_config(DeepSpeedConfig, None, ["stage=3", "extra.zero_optimization.stage3_prefetch_bucket_size=5000000",
                                              "extra.zero_optimization.zero_quantized_weights=true"])
    assert cfg.extra == {"zero_optimization": {"stage3_prefetch_bucket_size": 5000000, "zero_quantized_weights": True}}
    with pytest.raises(ConfigError, match="stage3_prefetch_bucket_size"):  # DeepSpeed's own verdict, by key
        load_config(DeepSpeedConfig, None, ["extra.zero_optimization.stage3_prefetch_bucket_size=lots"])


@pytest.mark.parametrize("extra, words", [
    ({"zero_optimization": {"stage3_max_live_paramters": 1}}, ["deepspeed.extra", "stage3_max_live_paramters"]),
    ({"zero_optimisation": {"stage": 3}}, ["does not read", "zero_optimisation"]),  # DeepSpeed ignores it itself
    ({"fp16": {"enabled": True, "loss_scal": 0}}, ["loss_scal"]),
    ({"train_batch_size": 64}, ["train_batch_size", "data.batch_size"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["scheduler", "optim.schedule"]),
])
def test_bad_extra_keys_are_errors_that_name_them(extra, words):
    with pytest.raises(ConfigError) as err:
        from_dict(DeepSpeedConfig, {"extra": extra}, "train.yaml")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_ops_deepspeed_will_build_are_known_before_it_builds_them():
    from tessera.trainer.ds_config import ops_to_build

    assert ops_to_build(_render({}, cuda=False)) == []  # torch's AdamW on CPU: nothing to compile
    assert ops_to_build(_render({})) == []  # CUDA: torch's fused AdamW, no JIT build
    assert ops_to_build(_render({"fused_adam": "deepspeed"})) == ["FusedAdamBuilder"]
    assert _render({})["optimizer"]["params"]["fused"] is True
    assert "fused" not in _render({}, cuda=False)["optimizer"]["params"]
    assert ops_to_build(_render({"fused_adam": "off", "offload_optimizer": True})) == ["CPUAdamBuilder"]


def test_zero1_where_the_states_fit_and_fp32_gradient_accumulation_under_bf16():
    """``stage: auto`` takes the lowest stage whose model states fit half the device (ZeRO formulas); bf16 runs
    accumulate gradients in fp32 and keep DeepSpeed's overflow check on."""
    from tessera.trainer.ds_config import resolve_stage

    ds = from_dict(DeepSpeedConfig, {}, "deepspeed")
    gb = 1024**3
    assert ds.stage == "auto"
    assert resolve_stage(ds, 600_000_000, 8, "bf16", 80 * gb) == 1  # PixArt-size: 6 GB + 7.2 GB/8 fits easily
    # 8B parameters: ZeRO-1 needs 32 + 96/8 = 44 GB > 40; ZeRO-2 needs 16 + 14 = 30 GB
    assert resolve_stage(ds, 8_000_000_000, 8, "bf16", 80 * gb) == 2
    assert resolve_stage(ds, 30_000_000_000, 8, "bf16", 80 * gb) == 3
    assert resolve_stage(from_dict(DeepSpeedConfig, {"stage": 2}, "d"), 10, 8, "bf16", 80 * gb) == 2  # as set
    out = _render({})
    assert out["data_types"] == {"grad_accum_dtype": "fp32"} and out["bf16"]["check_grad_overflow"]
    assert "data_types" not in _render({}, cuda=False)  # fp32: nothing to accumulate differently


def test_the_deepspeed_floor_is_checked_at_start_up(monkeypatch):
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    from tessera.trainer.engine import DEEPSPEED_FLOOR, require_deepspeed

    require_deepspeed()  # the installed one has bf16.check_grad_overflow
    fields = dict(DeepSpeedBF16Config.model_fields)
    fields.pop("check_grad_overflow")
    monkeypatch.setattr(DeepSpeedBF16Config, "model_fields", fields)
    with pytest.raises(RuntimeError, match=f"deepspeed>={DEEPSPEED_FLOOR}"):
        require_deepspeed()
