"""``tessera export --format diffusers``: folders the diffusers classes load, a whole PixArt pipeline that draws the
image ``tessera sample`` draws, Tessera's format with a message where diffusers has no equivalent, and encoders
carried by path or by copy, never by alias."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.config import from_dict
from tessera.trainer.config import TrainJobConfig
from tessera.trainer.export import write_export
from tessera.trainer.export_diffusers import export_any
from tessera.trainer.inference import generate, grid_seed, load_for_sampling

from . import published as P

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _export(tmp_path, model: dict, *, te=None, ae=None, objective=None, sampler=None, size=16):
    """A Tessera export of the model that ``model`` (a model section with init_from) builds."""
    cfg = from_dict(TrainJobConfig, {
        "model": model, "data": {"path": "unused"},
        "text_encoder": te or {"name": "hf_encoder", "hf_encoder": {"path": "minilm", "max_length": 8}},
        "autoencoder": ae or {"name": "identity"}, "objective": objective or {"name": "flow"},
        "samples": {"height": size, "width": size, "sampler": sampler or {"name": "euler", "steps": 3}}})
    write_export(str(tmp_path / "export"), cfg, {"ema": cfg.model.build().state_dict()}, source="test", step=0,
                 samples=0)
    return str(tmp_path / "export")


def _pixart_section(tmp_path, **layout):
    """A DiT section that imports a tiny PixArt (saved under tmp_path/pixart)."""
    from tessera.trainer.convert import read_weights

    P.pixart(tmp_path / "pixart", **layout)
    return {"name": "dit", "dit": read_weights(str(tmp_path / "pixart")).config, "init_from": str(tmp_path / "pixart")}


@pytest.mark.parametrize("objective, sampler", [({"name": "ddpm"}, {"name": "dpmpp_2m", "steps": 5, "cfg_scale": 3.0}),
                                                ({"name": "flow", "flow": {"shift": 2.0}},
                                                 {"name": "dpmpp_2m", "steps": 4, "cfg_scale": 2.0}),
                                                ({"name": "ddpm", "ddpm": {"prediction": "v"}},
                                                 {"name": "lcm", "steps": 3, "cfg_scale": 1.0, "lcm_origin_steps": 20})],
                         ids=["eps-dpmsolver", "flow-dpmsolver", "v-lcm"])
def test_pipeline_draws_the_image_tessera_samples(tmp_path, objective, sampler):
    from diffusers import DiffusionPipeline

    P.t5_folder(tmp_path / "t5")
    P.vae_folder(tmp_path / "vae", scaling_factor=0.5)
    src = _export(tmp_path, _pixart_section(tmp_path), objective=objective, sampler=sampler,
                  te={"name": "t5", "t5": {"path": str(tmp_path / "t5"), "max_length": 12}},
                  ae={"name": "kl", "kl": {"path": str(tmp_path / "vae"), "scaling_factor": 0.7}})  # not the VAE's own
    export_any(src, str(tmp_path / "out"), fmt="diffusers", components="copy")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.vae.config.scaling_factor == 0.7
    notes = json.loads((tmp_path / "out" / "tessera_diffusers.json").read_text())
    prompts = ["a red apple", "two blue cars"]
    model, te, ae, obj, smp, _ = load_for_sampling(src, device=CPU)
    ours = generate(model, te, ae, smp, obj, prompts, height=16, width=16, seed=3, device=CPU)
    for i, prompt in enumerate(prompts):  # the documented seed rule: image i of seed S <- grid_seed(S, i)
        img = pipe(prompt, generator=torch.Generator().manual_seed(grid_seed(3, i)), **notes["call"]).images[0]
        diff = np.abs(np.asarray(img, dtype=int) - np.asarray(ours[i], dtype=int))
        assert np.asarray(img).std() > 5
        if objective["name"] == "ddpm":
            assert diff.max() <= 1  # the same 8-bit image, up to one level of rounding
        else:  # diffusers' flow DPM-Solver feeds the model int(t * 1000), Tessera t * 1000: a few levels apart
            assert diff.max() <= 16 and diff.mean() <= 2
    if objective["name"] == "flow":  # ... and with that truncation undone, the same image again
        set_timesteps = pipe.scheduler.set_timesteps

        def float_timesteps(*args, **kwargs):
            set_timesteps(*args, **kwargs)
            pipe.scheduler.timesteps = pipe.scheduler.sigmas[:-1] * 1000

        pipe.scheduler.set_timesteps = float_timesteps
        img = pipe(prompts[0], generator=torch.Generator().manual_seed(grid_seed(3, 0)), **notes["call"]).images[0]
        assert np.abs(np.asarray(img, dtype=int) - np.asarray(ours[0], dtype=int)).max() <= 1


def test_components_by_path_are_symlinks_and_the_vae_scale_must_agree(tmp_path, caplog):
    from diffusers import DiffusionPipeline

    P.t5_folder(tmp_path / "t5")
    P.vae_folder(tmp_path / "vae", scaling_factor=0.5)
    te = {"name": "t5", "t5": {"path": str(tmp_path / "t5"), "max_length": 12}}
    sampler = {"name": "ddim", "steps": 3}
    src = _export(tmp_path, _pixart_section(tmp_path), te=te, ae={"name": "kl", "kl": {"path": str(tmp_path / "vae")}},
                  objective={"name": "ddpm"}, sampler=sampler)
    export_any(src, str(tmp_path / "linked"), fmt="diffusers", components="path")
    assert (tmp_path / "linked" / "vae").is_symlink()
    assert (tmp_path / "linked" / "text_encoder").resolve() == tmp_path / "t5"
    assert DiffusionPipeline.from_pretrained(tmp_path / "linked").scheduler.__class__.__name__ == "DDIMScheduler"
    # Tessera scales latents by 0.7, the VAE's own config says 0.5: a symlink cannot carry that, so no pipeline.
    shutil.rmtree(tmp_path / "export")
    src = _export(tmp_path, _pixart_section(tmp_path), te=te, objective={"name": "ddpm"}, sampler=sampler,
                  ae={"name": "kl", "kl": {"path": str(tmp_path / "vae"), "scaling_factor": 0.7}})
    with caplog.at_level(logging.WARNING, logger="tessera.export"):
        export_any(src, str(tmp_path / "mismatch"), fmt="diffusers", components="path")
    assert "--components copy" in caplog.text and not (tmp_path / "mismatch" / "model_index.json").exists()
    assert (tmp_path / "mismatch" / "tessera.json").exists()


@pytest.mark.parametrize("variant", [dict(), dict(qk_norm="rms_norm", dual=(0,))], ids=["sd3", "sd3.5-medium"])
def test_mmdit_exports_an_sd3_transformer(tmp_path, variant, caplog):
    from diffusers import SD3Transformer2DModel

    from tessera.trainer.convert import read_weights
    from tessera.trainer.models import load_pretrained

    P.sd3(tmp_path / "sd3", **variant)
    section = {"name": "mmdit", "mmdit": read_weights(str(tmp_path / "sd3")).config, "init_from": str(tmp_path / "sd3")}
    src = _export(tmp_path, section)
    with caplog.at_level(logging.WARNING, logger="tessera.export"):
        export_any(src, str(tmp_path / "out"), fmt="diffusers")
    assert "open_clip" in caplog.text  # why no SD3 pipeline: Tessera's CLIP encoder is not transformers'
    ref = SD3Transformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer")
    ours = load_pretrained(tmp_path / "out" / "ema")  # and Tessera's format beside it
    inp = P.inputs(h=8, w=12)
    with torch.no_grad():
        want = ref(inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"], timestep=inp["t"],
                   return_dict=False)[0]
        got = ours(inp["x"], inp["t"], inp["text"], inp["text_mask"], inp["pooled"])
    P.assert_rel_close(got, want)


def test_unet_exports_an_sd_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    src = _export(tmp_path, {"name": "unet", "unet": {"preset": "tiny", "kwargs": {"cross_attention_dim": 384}}})
    export_any(src, str(tmp_path / "out"), fmt="diffusers")
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert ref.config.cross_attention_dim == 384 and (tmp_path / "out" / "tessera.json").exists()


def test_tessera_only_model_exports_tessera_format_with_paths_not_aliases(tmp_path, caplog):
    section = {"name": "dit", "dit": {"preset": "tiny", "in_channels": 3, "text_dim": 384, "pooled_dim": 384,
                                      "base_size": 8}}
    src = _export(tmp_path, section)
    with caplog.at_level(logging.WARNING, logger="tessera.export"):
        export_any(src, str(tmp_path / "out"), fmt="diffusers")
    assert "no diffusers model" in caplog.text and "pooled_dim" in caplog.text
    meta = json.loads((tmp_path / "out" / "tessera.json").read_text())
    path = meta["text_encoder"]["hf_encoder"]["path"]
    assert path != "minilm" and (Path(path) / "config.json").is_file()
    assert meta["components"]["text_encoder"] == {"from": "minilm", "path": path, "mode": "path"}
    assert not (tmp_path / "out" / "transformer").exists()
    load_for_sampling(str(tmp_path / "out"), device=CPU)  # samples as it is


def test_components_by_copy_survive_the_original_folder(tmp_path):
    P.t5_folder(tmp_path / "t5")
    src = _export(tmp_path, {"name": "dit", "dit": {"preset": "tiny", "in_channels": 3, "text_dim": P.TEXT_DIM,
                                                    "base_size": 8}},
                  te={"name": "t5", "t5": {"path": str(tmp_path / "t5"), "max_length": 8}})
    from tessera.trainer.export_components import carry_tessera

    shutil.copytree(src, tmp_path / "out")  # `tessera export --components copy` runs this on its fresh export
    record = carry_tessera(str(tmp_path / "out"), "copy")
    shutil.rmtree(tmp_path / "t5")
    assert record["text_encoder"]["path"].startswith(str(tmp_path / "out" / "components"))
    _, te, *_ = load_for_sampling(str(tmp_path / "out"), device=CPU)
    assert te.encode(["hello"]).hidden.shape[-1] == P.TEXT_DIM
