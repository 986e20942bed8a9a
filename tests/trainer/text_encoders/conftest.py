"""Tiny text encoders built from configs, saved to temp dirs and loaded back through the user path."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing model must fail fast, never try the network

import pytest
import torch

TINY_CLIP = "tessera-tiny-clip"


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    """A 1-layer, 32-wide T5 encoder plus a ByT5 tokenizer (needs no vocab files)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    path = tmp_path_factory.mktemp("tiny_t5")
    transformers.T5EncoderModel(cfg).save_pretrained(path)
    transformers.ByT5Tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory):
    """A 2-layer, 32-wide Llama causal LM plus a ByT5 tokenizer.

    Llama, not Qwen2: transformers 5 forces Qwen2Tokenizer for model_type qwen2 whatever
    tokenizer_config.json says, while for llama it honours the saved tokenizer class.
    """
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    transformers.ByT5Tokenizer().save_pretrained(path)
    assert type(transformers.AutoTokenizer.from_pretrained(path)).__name__ == "ByT5Tokenizer"
    return str(path)


@pytest.fixture(scope="session")
def clip_ckpt(tmp_path_factory):
    """A tiny open_clip model registered as TINY_CLIP; returns its safetensors checkpoint path."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        # vocab 49408: the bundled BPE tokenizer emits ids up to 49407 (EOT)
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    ckpt = root / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return str(ckpt)


def assert_frozen(encoder) -> None:
    """Every wrapped module is in eval mode with no trainable parameter."""
    modules = encoder.modules()
    assert modules
    for m in modules:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())


@pytest.fixture(scope="session")
def llm_bos_dir(tmp_path_factory):
    """The tiny Llama with a Llama/Gemma-style tokenizer that prepends BOS (a small trained BPE)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["a cat sleeping", "a dog running on the beach", "describe the image"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    path = tmp_path_factory.mktemp("tiny_llama_bos")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    assert transformers.AutoTokenizer.from_pretrained(path)("")["input_ids"] == [1]  # BOS only
    return str(path)
