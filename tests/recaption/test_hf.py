"""The ``hf`` captioner on tiny random VLMs loaded back from ``save_pretrained`` dirs: a chat model (Qwen2-VL, with
a chat template) and a plain captioner (BLIP). Captions are checked against transformers' own ``generate``."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tessera.config import from_dict, to_dict
from tessera.recaption.captioners import build_captioner, prepare_batch
from tessera.recaption.config import CaptionerConfig
from tessera.recaption.hf import model_identity
from tests.recaption.conftest import blip_captioner, qwen_captioner
from tests.recaption.tiny_vlms import build_tiny_qwen2vl


def png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(colour, (6, 6, size[0] - 6, size[1] - 6))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


IMAGES = [png(c) for c in [(220, 20, 30), (30, 120, 230), (255, 220, 0), (0, 160, 0)]]


def captioner(section: dict) -> tuple[dict, object]:
    cfg = from_dict(CaptionerConfig, section, "test")
    return to_dict(cfg), build_captioner(cfg)


def test_chat_model_uses_its_template_and_matches_plain_generate(tiny_qwen):
    plain, cap = captioner(qwen_captioner(tiny_qwen, sampling={"max_new_tokens": 6, "temperature": 0,
                                                                     "repetition_penalty": 1.0}))
    assert cap.chat and cap.prompt.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in cap.prompt
    prepared = prepare_batch(plain, IMAGES)
    assert prepared["input_ids"].shape[0] == 4 and "pixel_values" in prepared and "token_type_ids" not in prepared
    gens = cap.generate(prepared, [""] * 4, seed=0, temperature=None)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, data in enumerate(IMAGES):  # one image at a time, greedy, the way a plain transformers loop does it
        inp = proc(text=[cap.prompt], images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
        inp.pop("token_type_ids", None)
        with torch.inference_mode():
            seq = model.generate(**inp, max_new_tokens=6, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
        new = seq[:seq.index(eos)] if eos in seq else seq
        assert gens[i].text == proc.tokenizer.decode(new, skip_special_tokens=True).strip()
        assert gens[i].tokens == len(new)
        assert gens[i].finish_reason == ("stop" if eos in seq or len(seq) < 6 else "length")


def test_sampling_is_seeded_and_temperature_overrides(tiny_qwen):
    plain, cap = captioner(qwen_captioner(tiny_qwen, sampling={"max_new_tokens": 8, "temperature": 1.0}))
    prepared = prepare_batch(plain, IMAGES)
    a = [g.text for g in cap.generate(prepared, [""] * 4, seed=7, temperature=None)]
    assert a == [g.text for g in cap.generate(prepared, [""] * 4, seed=7, temperature=None)]
    assert a != [g.text for g in cap.generate(prepared, [""] * 4, seed=8, temperature=None)]
    greedy = [g.text for g in cap.generate(prepared, [""] * 4, seed=7, temperature=0.0)]
    assert greedy == [g.text for g in cap.generate(prepared, [""] * 4, seed=99, temperature=0.0)]


def test_hitting_max_new_tokens_is_finish_reason_length(tiny_qwen):
    plain, cap = captioner(qwen_captioner(tiny_qwen, sampling={"max_new_tokens": 3, "temperature": 0}))
    gens = cap.generate(prepare_batch(plain, IMAGES), [""] * 4, seed=0, temperature=None)
    for g in gens:  # a random model rarely says <|im_end|> within 3 tokens; when it does, it stopped
        assert (g.finish_reason, g.tokens) == ("length", 3) or (g.finish_reason == "stop" and g.tokens < 3)
    assert any(g.finish_reason == "length" for g in gens)


def test_plain_captioner_without_chat_template(tiny_blip):
    plain, cap = captioner(blip_captioner(tiny_blip, sampling={"max_new_tokens": 5, "temperature": 0}))
    assert not cap.chat and cap.prompt == "a picture of"
    gens = cap.generate(prepare_batch(plain, IMAGES), [""] * 4, seed=0, temperature=None)
    assert len(gens) == 4 and all(g.text.startswith("a picture of") for g in gens)  # keep_prompt: BLIP's convention
    assert all(0 <= g.tokens <= 5 for g in gens)
    plain, cap = captioner(blip_captioner(tiny_blip, keep_prompt=False, sampling={"max_new_tokens": 5,
                                                                                 "temperature": 0}))
    dropped = cap.generate(prepare_batch(plain, IMAGES), [""] * 4, seed=0, temperature=None)
    assert [f"a picture of {g.text}".strip() for g in dropped] == [g.text for g in gens]


def test_provenance_names_model_weights_prompt_and_sampling(tiny_qwen, tmp_path):
    section = qwen_captioner(tiny_qwen)
    _, cap = captioner(section)
    p = cap.provenance()
    assert p["captioner"] == "hf" and p["model"] == str(tiny_qwen) and p["revision"] is None
    assert p["weights"].startswith("sha256:") and len(p["prompt_sha256"]) == 16
    assert p["sampling"] == {"max_new_tokens": 10, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05}
    other = build_tiny_qwen2vl(tmp_path / "other", seed=1)  # same architecture, other weights
    h = from_dict(CaptionerConfig, section, "test").hf
    assert model_identity(h) != model_identity(from_dict(CaptionerConfig, qwen_captioner(other), "test").hf)
    assert model_identity(from_dict(CaptionerConfig, qwen_captioner("Qwen/Qwen2-VL-2B-Instruct", revision="abc"),
                                    "test").hf) == "hub:Qwen/Qwen2-VL-2B-Instruct@abc"


def test_config_errors_name_the_problem():
    with pytest.raises(Exception, match="needs an 'hf' section"):
        from_dict(CaptionerConfig, {"name": "hf", "variant": "v"}, "test")
    with pytest.raises(Exception, match="other than 'alt'"):
        from_dict(CaptionerConfig, {"name": "attributes", "variant": "alt"}, "test")
    with pytest.raises(Exception, match="attributes set but name is 'hf'"):
        from_dict(CaptionerConfig, {"name": "hf", "variant": "v", "hf": {"model": "m"}, "attributes": {}}, "test")
    with pytest.raises(Exception, match="temperature"):
        from_dict(CaptionerConfig, {"name": "hf", "variant": "v", "hf": {"model": "m",
                                                                       "sampling": {"temperature": -1}}}, "test")
