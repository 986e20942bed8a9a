"""LoRA through PEFT: the wrapped model computes the base's outputs at init, adapters off give the reference back
after training, the merged weights reproduce the adapted model, and the adapter files load with PEFT."""

from __future__ import annotations

import pytest
import torch

from tessera.finetune.config import LoraSettings
from tessera.finetune.policy import Reference, adapter_files, merged_weights, wrap_lora
from tessera.trainer.models import DiTConfig, build_model


def tiny_dit():
    torch.manual_seed(0)
    m = build_model("dit", DiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2, text_dim=32,
                                     base_size=4))
    for p in m.parameters():
        p.data.normal_(0, 0.1)  # non-zero everywhere, as after training
    return m


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, generator=g) * 1000,
            torch.randn(3, 5, 32, generator=g), torch.ones(3, 5, dtype=torch.bool))


@torch.no_grad()
def test_lora_starts_as_the_base_and_adapters_off_is_the_reference(tmp_path):
    base = tiny_dit()
    want = base(*inputs())
    pol = wrap_lora(base, LoraSettings(rank=2, alpha=4.0))
    assert torch.equal(pol(*inputs()), want)  # B = 0: exactly the base
    names = [n for n, p in pol.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert any("blocks.0.attn.qkv" in n for n in names) and any("mlp.fc2" in n for n in names)
    assert not any("t_embedder" in n or "final_layer" in n for n in names)
    for n, p in pol.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)
    adapted = pol(*inputs())
    assert not torch.allclose(adapted, want)
    with Reference(pol).model() as ref:
        assert torch.equal(ref(*inputs()), want)

    merged = build_model("dit", base.config)
    merged.load_state_dict(merged_weights(pol))
    torch.testing.assert_close(merged(*inputs()), adapted, rtol=1e-5, atol=1e-5)

    from peft import PeftModel
    from safetensors.torch import save_file

    files = adapter_files(pol)
    (tmp_path / "lora").mkdir()
    save_file(files["lora/adapter_model.safetensors"], str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(files["lora/adapter_config.json"])
    loaded = PeftModel.from_pretrained(tiny_dit(), str(tmp_path / "lora"))
    torch.testing.assert_close(loaded(*inputs()), adapted, rtol=1e-6, atol=1e-6)


def test_full_fine_tuning_keeps_a_frozen_reference_copy():
    m = tiny_dit()
    ref = Reference(m)
    with torch.no_grad():
        want = m(*inputs())
        for p in m.parameters():
            p.add_(0.01)
        with ref.model() as r:
            assert torch.equal(r(*inputs()), want) and not any(p.requires_grad for p in r.parameters())


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="matched no linear"):
        wrap_lora(tiny_dit(), LoraSettings(target_modules=r"nothing\.here"))


def test_a_checkpoint_carries_its_bases_sampler_not_the_rollouts():
    """What ``tessera sample/eval`` read from a fine-tuning checkpoint: the base run's sampler (its guidance
    interval included), so one eval config samples base and tuned models alike; the run section is this job's."""
    from types import SimpleNamespace

    from tessera.finetune.policy import checkpoint_job
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.data.config import LoaderConfig
    from tessera.trainer.diffusion.sampling import SamplerConfig
    from tessera.run_dir import RunConfig

    sampler = SamplerConfig(name="euler", steps=12, cfg_scale=3.0, guidance_interval=[0.3, 1.0])
    base = SimpleNamespace(job=TrainJobConfig(data=LoaderConfig(path="ds")), sampler=sampler, size=(16, 32))
    job = checkpoint_job(base, RunConfig(id="tuned"))
    assert job.samples.sampler == sampler and job.samples.sampler.guidance_interval == [0.3, 1.0]
    assert (job.samples.height, job.samples.width, job.run.id) == (16, 32, "tuned") and not job.samples.enabled
