"""Strict typed configs: YAML + base chains + dotted overrides, and their error messages."""

import enum
from dataclasses import dataclass, field
from typing import Literal

import pytest

from tessera.config import ConfigError, config_hash, dump_yaml, from_dict, load_config, to_dict


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(kw_only=True)
class DiT:
    name: Literal["dit"] = "dit"
    depth: int = 4
    width: int = 256
    qk_norm: bool = False


@dataclass(kw_only=True)
class UNet:
    name: Literal["unet"] = "unet"
    channels: list[int] = field(default_factory=lambda: [64, 128])


@dataclass(kw_only=True)
class Train:
    lr: float = 1e-4
    steps: int = 10
    precision: Precision = Precision.FP32
    schedule: Literal["cosine", "constant"] = "cosine"
    tags: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=lambda: {"alt": 1.0})
    resume: str | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class Job:
    model: DiT | UNet = field(default_factory=DiT)
    train: Train = field(default_factory=Train)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_roundtrip():
    cfg = load_config(Job)
    assert cfg.model.depth == 4 and cfg.train.precision is Precision.FP32
    again = from_dict(Job, to_dict(cfg))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert dump_yaml(cfg).startswith(f"# config_hash: {config_hash(cfg)}\n")


def test_yaml_base_chain_deep_merges_in_order(tmp_path):
    write(tmp_path, "a.yaml", "train: {lr: 0.1, steps: 5, tags: [a]}\nmodel: {depth: 2}\n")
    write(tmp_path, "b.yaml", "train: {steps: 7}\n")
    p = write(tmp_path, "c.yaml", "base: [a.yaml, b.yaml]\ntrain: {tags: [c]}\n")
    cfg = load_config(Job, p)
    assert (cfg.train.lr, cfg.train.steps, cfg.train.tags, cfg.model.depth) == (0.1, 7, ["c"], 2)


def test_overrides_parse_by_declared_type(tmp_path):
    cfg = load_config(Job, None, ["train.lr=3e-4", "train.steps=12", "model.qk_norm=true", "train.precision=bf16",
                                  "train.schedule=constant", "train.tags=[x, y]", "train.ratios={alt: 0.5, vlm: 0.5}",
                                  "train.resume=null", "model.width=64"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 12 and cfg.model.qk_norm is True and cfg.model.width == 64
    assert cfg.train.precision is Precision.BF16 and cfg.train.schedule == "constant"
    assert cfg.train.tags == ["x", "y"] and cfg.train.ratios == {"alt": 0.5, "vlm": 0.5}
    assert load_config(Job, None, ["train.tags=a,b"]).train.tags == ["a", "b"]


def test_tagged_union_selects_member_by_name(tmp_path):
    p = write(tmp_path, "u.yaml", "model: {name: unet, channels: [32, 64]}\n")
    cfg = load_config(Job, p, ["model.channels=[8, 16]"])
    assert isinstance(cfg.model, UNet) and cfg.model.channels == [8, 16]
    cfg = load_config(Job, None, ["model.name=unet"])
    assert isinstance(cfg.model, UNet)
    with pytest.raises(ConfigError, match=r"key 'model.name' must be one of 'dit', 'unet', got 'dti'; did you mean 'dit'"):
        load_config(Job, write(tmp_path, "bad.yaml", "model: {name: dti}\n"))


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = write(tmp_path, "job.yaml", "train:\n  lr: 0.1\n  stesp: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, p)
    msg = str(e.value)
    assert "'train.stesp'" in msg and str(p) in msg and "did you mean 'train.steps'" in msg


def test_unknown_key_in_base_file_names_that_file(tmp_path):
    base = write(tmp_path, "base.yaml", "model: {depht: 3}\n")
    p = write(tmp_path, "top.yaml", "base: [base.yaml]\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, p)
    assert str(base) in str(e.value) and "'model.depht'" in str(e.value) and "'model.depth'" in str(e.value)


def test_unknown_override_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'model.dpth'.*did you mean 'model.depth'"):
        load_config(Job, None, ["model.dpth=3"])


@pytest.mark.parametrize("override,expected", [
    ("train.steps=abc", "key 'train.steps' expects int"),
    ("train.lr=fast", "key 'train.lr' expects float"),
    ("model.qk_norm=maybe", "key 'model.qk_norm' expects bool"),
    ("train.precision=fp8", "key 'train.precision' expects one of 'fp32', 'bf16'"),
    ("train.tags={a: 1}", "key 'train.tags' expects list of str"),
])
def test_wrong_type_in_override_names_key_and_type(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(Job, None, [override])


def test_wrong_type_in_yaml_names_key_and_type(tmp_path):
    p = write(tmp_path, "t.yaml", "train: {steps: 1.5}\n")
    with pytest.raises(ConfigError, match=r"key 'train.steps' expects int, got float 1.5"):
        load_config(Job, p)
    p = write(tmp_path, "t2.yaml", "model: {qk_norm: 1}\n")
    with pytest.raises(ConfigError, match=r"key 'model.qk_norm' expects bool"):
        load_config(Job, p)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Job, tmp_path / "nope.yaml")
    p = write(tmp_path, "x.yaml", "base: [missing_base.yaml]\n")
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        load_config(Job, p)


def test_post_init_validation_and_unsafe_yaml(tmp_path):
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_config(Job, None, ["train.lr=-1"])
    # safe_load refuses python object tags: no code execution through a config.
    p = write(tmp_path, "evil.yaml", "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Job, p)


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: [b.yaml]\n")
    write(tmp_path, "b.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(Job, tmp_path / "a.yaml")


@dataclass(kw_only=True)
class FineJob:
    # A parent that picks its own defaults for a section (as fine-tuning does for deepspeed.reduce_bucket_size).
    train: Train = field(default_factory=lambda: Train(lr=3e-4, tags=["ft"]))


def test_a_partial_section_keeps_the_defaults_its_parent_chose(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train: {steps: 99}\n")
    cfg = load_config(FineJob, path)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.tags) == (99, 3e-4, ["ft"])
    assert load_config(FineJob, path, ["train.lr=1e-2"]).train.lr == 1e-2  # an explicit value still wins
    assert load_config(FineJob, None, ["train.steps=5"]).train.lr == 3e-4  # overrides build partial sections too


def test_finetune_deepspeed_stage_keeps_the_small_reduce_bucket():
    from tessera.finetune.config import FinetuneJobConfig

    cfg = load_config(FinetuneJobConfig, "configs/finetune/base.yaml")  # sets deepspeed: {stage: 2}
    assert (cfg.deepspeed.stage, cfg.deepspeed.reduce_bucket_size) == (2, 1_000_000)
