"""What ``tessera data recaption`` is told: the captioners (each with its variant, model, prompt and sampling), the
quality filters, and how the job is spread over Ray actors. No heavy imports: the CLI prints it cheaply.

    captioners:
      - name: hf                      # or vllm (same hf section: a one-line switch on a GPU), or attributes
        variant: vlm_short
        hf: {model: Qwen/Qwen2-VL-2B-Instruct, prompt: "Describe this image in one sentence."}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from tessera.config import config_hash, to_dict
from tessera.ray_runtime import RayConfig
from tessera.storage import StorageConfig

VERDICTS = ("ok", "empty", "refusal", "truncated", "repetition", "too_short", "too_long")
_VARIANT = re.compile(r"^[A-Za-z0-9_-]+$")
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Part = Literal["colours", "tone", "background", "orientation"]

# Said by chat VLMs when they will not describe an image; matched near the start of a caption, lower-cased.
REFUSALS = ["i'm sorry", "i am sorry", "sorry, but", "i cannot", "i can't", "i can not", "i'm unable", "i am unable",
            "unable to", "i apologize", "as an ai", "cannot assist", "cannot help", "can't help", "not able to"]
# Openers that say nothing about the image; stripped (and recorded) before the caption is checked.
OPENERS = ["the image shows", "the image depicts", "the image features", "the image is", "this image shows",
           "this image depicts", "this image features", "this is an image of", "this is a picture of",
           "the picture shows", "the photo shows", "this photo shows", "in this image,", "in the image,",
           "the image contains"]  # not "a photo of": that names a style the text-to-image model should learn


@dataclass(kw_only=True)
class SamplingConfig:
    """How a VLM generates: greedy decoding loops on Qwen-style models, so sampling is the default."""

    max_new_tokens: int = 77
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.05  # 1.0: off
    retry_temperature: float = 1.0  # a rejected caption is generated once more at this temperature

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.retry_temperature < 0:
            raise ValueError("temperature and retry_temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(kw_only=True)
class HFCaptionerConfig:
    """An image-text-to-text model of HF transformers (``AutoProcessor`` + ``AutoModelForImageTextToText``)."""

    model: str  # a local directory or a hub id
    revision: str | None = None  # hub branch, tag or commit; recorded in every caption's provenance
    prompt: str = "Describe this image in one sentence."
    system: str | None = None  # a system message for chat models
    chat: Literal["auto", "on", "off"] = "auto"  # auto: the processor's chat template if it has one (BLIP has none)
    keep_prompt: bool = False  # plain prompts that begin the caption (BLIP's "a picture of") stay in it
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_pixels: int = 448 * 448  # images are downscaled (aspect kept) to at most this many pixels before the processor
    dtype: Dtype = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    device: str = "auto"  # auto: the actor's GPU when it has one, else the CPU
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2; None: transformers' default
    trust_remote_code: bool = False  # only a config may opt in to running a model repository's code

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a local directory or a hub id")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(kw_only=True)
class VLLMConfig:
    """Engine options of the ``vllm`` captioner; the model, prompt and sampling come from its ``hf`` section."""

    tensor_parallel_size: int = 1  # GPUs per engine (one engine per Ray actor)
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096
    enforce_eager: bool = False
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.max_model_len < 1 or self.max_num_seqs < 1:
            raise ValueError("tensor_parallel_size, max_model_len and max_num_seqs must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(kw_only=True)
class AttributesConfig:
    """The weight-free captioner: measured colours, tone, background and orientation appended to a caption."""

    source: str = "alt"  # the variant the words are appended to; an empty or missing one gives the words alone
    parts: list[Part] = field(default_factory=lambda: ["colours", "tone", "background", "orientation"])
    max_colours: int = 3
    min_share: float = 0.1  # of the foreground, for a colour to be named

    def __post_init__(self) -> None:
        if not self.parts or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts must list distinct parts, got {self.parts}")
        if self.max_colours < 1 or not 0 < self.min_share <= 1:
            raise ValueError("max_colours must be >= 1 and min_share in (0, 1]")


@dataclass(kw_only=True)
class CaptionerConfig:
    """One captioner of the job: a registry ``name``, the caption ``variant`` it writes, and its section."""

    name: Literal["hf", "vllm", "attributes"]
    variant: str  # KEY.json captions[<variant>]; the loader's data.caption_variants picks it by ratio
    hf: HFCaptionerConfig | None = None  # the model (also for name: vllm)
    vllm: VLLMConfig | None = None  # engine options for name: vllm (defaults when absent)
    attributes: AttributesConfig | None = None

    def __post_init__(self) -> None:
        if not _VARIANT.match(self.variant or "") or self.variant == "alt":
            raise ValueError(f"variant must be a name of letters, digits, '_' or '-' other than 'alt', "
                             f"got {self.variant!r}")
        if self.name in ("hf", "vllm") and self.hf is None:
            raise ValueError(f"captioner {self.variant!r}: name {self.name} needs an 'hf' section (model, prompt, "
                             "sampling)")
        wrong = {"hf": ["attributes"], "vllm": ["attributes"], "attributes": ["hf", "vllm"]}[self.name]
        if self.name == "hf":
            wrong.append("vllm")
        extra = [s for s in wrong if getattr(self, s) is not None]
        if extra:
            raise ValueError(f"captioner {self.variant!r}: section(s) {', '.join(extra)} set but name is {self.name!r}")
        if self.name == "vllm" and self.vllm is None:
            self.vllm = VLLMConfig()
        if self.name == "attributes" and self.attributes is None:
            self.attributes = AttributesConfig()

    @property
    def uses_model(self) -> bool:
        """Whether the captioner runs a network (and so wants a GPU when there is one)."""
        return self.name != "attributes"


@dataclass(kw_only=True)
class FilterConfig:
    """The checks every caption passes; lengths are counted in the target text encoder's tokens."""

    tokenizer: str = "minilm"  # the text encoder that will read the captions (local dir, hub id or minilm)
    min_tokens: int = 3
    max_tokens: int = 30  # MiniLM keeps 32 with [CLS]/[SEP]; T5 keeps 120 (PixArt-alpha) or 300 (PixArt-Sigma)
    max_compression_ratio: float = 2.4  # zlib: len(text) / len(compressed); loops compress well (Whisper's rule)
    loop_repeats: int = 3  # an n-gram said this many times back to back ...
    loop_min_words: int = 6  # ... spanning at least this many words is a loop ("very very very" is not)
    refusals: list[str] = field(default_factory=lambda: list(REFUSALS))
    openers: list[str] = field(default_factory=lambda: list(OPENERS))
    # Verdicts that drop a caption (the others are recorded and kept); an empty caption is always dropped.
    reject: list[str] = field(default_factory=lambda: list(VERDICTS[1:]))

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_tokens < max(1, self.min_tokens):
            raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        bad = [v for v in self.reject if v not in VERDICTS[1:]]
        if bad:
            raise ValueError(f"reject lists unknown verdict(s) {bad}; known: {', '.join(VERDICTS[1:])}")
        if self.loop_repeats < 2 or self.max_compression_ratio <= 0:
            raise ValueError("loop_repeats must be >= 2 and max_compression_ratio > 0")


@dataclass(kw_only=True)
class RecaptionConfig:
    """Everything ``tessera data recaption`` needs; ``source``/``output`` are directories or s3:// prefixes."""

    source: str  # a Tessera dataset (ingest, precompute or an earlier recaption output)
    output: str  # a new, derived dataset; never the source itself
    captioners: list[CaptionerConfig]
    filters: FilterConfig = field(default_factory=FilterConfig)
    batch_size: int = 8  # images per generate call, all from one aspect bucket (equal image token counts)
    window: int = 256  # samples of a shard read at a time; batches are formed per bucket within a window
    seed: int = 0  # with the batch's first key, seeds each generate call: output bytes do not depend on actors
    overwrite: bool = False  # False: a source sample that already has one of the variants is an error
    executor: Literal["ray", "local"] = "ray"
    ray: RayConfig = field(default_factory=RayConfig)
    actors: int | None = None  # None: one per GPU (of a model captioner), else one per CPU core
    threads: int | None = None  # torch threads per actor; None: the actor's share of the cores
    prefetch: int = 2  # batches decoded and preprocessed ahead of generation
    # Where decode + preprocessing runs: "tasks" = Ray tasks on CPU workers (never in a GPU actor), "actor" = a
    # thread in the actor, "auto" = tasks when the actors have GPUs, the actor's thread on a CPU-only cluster
    # (where tasks would only add processes competing for the same cores). The local executor uses a thread.
    prepare_on: Literal["auto", "tasks", "actor"] = "auto"
    prepare_cpus: float = 0.25  # Ray CPUs one decode/preprocess task reserves
    max_task_retries: int = 2  # shard retries after an actor dies
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.source or not self.output:
            raise ValueError("source and output must name a directory or s3:// prefix")
        if self.source.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from source (recaption writes a new, derived dataset)")
        if not self.captioners:
            raise ValueError("captioners must list at least one captioner")
        variants = [c.variant for c in self.captioners]
        if len(set(variants)) != len(variants):
            raise ValueError(f"captioners must write distinct variants, got {variants}")
        for name, value, low in (("batch_size", self.batch_size, 1), ("window", self.window, 1),
                                 ("prefetch", self.prefetch, 1), ("max_task_retries", self.max_task_retries, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1 or null, got {self.actors}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        if not 0 < self.prepare_cpus <= 64:
            raise ValueError(f"prepare_cpus must be in (0, 64], got {self.prepare_cpus}")


def fingerprint_parts(cfg: RecaptionConfig, weights: dict[str, str]) -> dict:
    """What decides the output bytes, by part: captioners (models, prompts, sampling), weights, filters, batching."""
    return {"captioners": {c.variant: config_hash(c) for c in cfg.captioners}, "weights": dict(sorted(weights.items())),
            "filters": config_hash(cfg.filters), "batching": {"batch_size": cfg.batch_size, "window": cfg.window},
            "seed": cfg.seed, "overwrite": cfg.overwrite}


def job_fingerprint(parts: dict, source_manifest_sha256: str) -> str:
    """One hash of the fingerprint parts and the source; a rerun into the same output must match it."""
    return config_hash({"source_manifest_sha256": source_manifest_sha256, **to_dict(parts)})
