"""Tiny random VLMs built from configs (hidden 32, 2 layers) and saved with ``save_pretrained``, so tests load them
through the same ``AutoProcessor`` + ``AutoModelForImageTextToText.from_pretrained`` path a user's model id takes.
No weights are committed: a byte-level BPE tokenizer is trained in memory (Qwen2-VL) or a vocab file written (BLIP).
"""

from __future__ import annotations

from pathlib import Path

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's turn format with the image placeholder that its processor expands to the image's tokens.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["a yellow heart emoji on a white background", "describe this image in one sentence",
          "clip art of a red apple, fruit, food", "a photo of a brown dog sitting on green grass",
          "system user assistant", "the image shows a blue car in a city street"]


def _bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory on a few captions, with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    # generate() breaks on token_type_ids; batched generation needs left padding.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"], padding_side="left")


def build_tiny_qwen2vl(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Qwen2-VL (chat template, 14-px patches merged 2x2) saved to ``path``."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _bpe_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    heads = max(2, hidden // 16)
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 1,
                     "max_position_embeddings": 1024, "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|endoftext|>"],
                     "rope_scaling": {"type": "mrope", "mrope_section": _mrope(hidden // heads)}},
        vision_config={"depth": layers, "embed_dim": hidden, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                                 tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _mrope(head_dim: int) -> list[int]:
    """Multimodal rotary sections (temporal, height, width) summing to half the head dimension."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def build_tiny_blip(path: Path, seed: int = 0) -> Path:
    """A random BLIP captioner (no chat template: plain prompts) with a word-piece vocab file, saved to ``path``."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor
    from transformers import BlipProcessor

    path.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in CORPUS for w in line.replace(",", " ").split()})
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *("##" + c for c in letters)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(str(path / "vocab.txt"), model_input_names=["input_ids", "attention_mask"])
    cfg = BlipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 32, "max_position_embeddings": 128,
                     "bos_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.sep_token_id},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
