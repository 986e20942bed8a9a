"""Evaluation suites: config, resumable and layout-independent generation, metrics.json, report, W&B, CLI."""

from __future__ import annotations

import hashlib
import html.parser
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tessera.evaluation import generate as G
from tessera.evaluation.checkpoints import CheckpointInfo
from tessera.evaluation.config import EvalSuiteConfig, load_suite
from tessera.config import ConfigError, config_hash, to_dict

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs" / "eval" / "quick.yaml"


class FakeGenerator:
    """Images that depend only on (prompt, seed): seeded noise over a prompt-derived colour."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        out = []
        for p, s in zip(prompts, seeds):
            color = np.frombuffer(hashlib.sha256(p.encode()).digest()[:3], np.uint8).astype(np.int64)
            noise = np.random.default_rng(s).integers(0, 96, (32, 32, 3))
            out.append(Image.fromarray((noise + color).clip(0, 255).astype(np.uint8)))
        self.images += len(prompts)
        return out


class FakeFactory:
    """Picklable factory (Ray actors build their own generator)."""

    def __init__(self, *args, **kwargs) -> None:
        self.built: list[FakeGenerator] = []

    def __call__(self) -> FakeGenerator:
        g = FakeGenerator()
        self.built.append(g)
        return g


def folder_bytes(url: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(url) / "images").glob("*.png"))}


# --------------------------------------------------------------------------- config and CLI


def test_quick_suite_loads_with_overrides_and_rejects_unknown_keys(tmp_path):
    cfg = load_suite(QUICK, ["sampling.steps=4", "prompts.limit=3", "fid.reference=/data/ref"])
    assert (cfg.sampling.steps, cfg.prompts.limit, cfg.fid.reference) == (4, 3, "/data/ref")
    assert cfg.sampling.precision == "fp32" and cfg.fid.resize == "clean_bicubic"
    cfg.check()
    with pytest.raises(ConfigError, match="sampling.stepz"):
        load_suite(QUICK, ["sampling.stepz=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [" + str(QUICK) + "]\nfid: {refrence: x}\n")
    with pytest.raises(ConfigError, match="refrence.*did you mean 'fid.reference'"):
        load_suite(bad)
    with pytest.raises(ConfigError, match="fid.reference is required"):
        load_suite(QUICK, ["fid.reference=null"]).check()
    with pytest.raises(ConfigError, match="clip_score.checkpoint"):
        load_suite(QUICK, ["clip_score.enabled=true"]).check()
    with pytest.raises(ConfigError, match="images_per_prompt"):
        load_suite(QUICK, ["sampling.images_per_prompt=0"])


def test_cli_dry_run_prints_resolved_config(capsys):
    from tessera.evaluation.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--config", str(QUICK), "--dry-run", "sampling.steps=7", "--checkpoint", "x"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("# config_hash: ") and "steps: 7" in out and "reference: runs/data/emoji" in out
    assert main(["eval", "--config", str(QUICK)]) == 2  # no checkpoint


# --------------------------------------------------------------------------- generation


def test_image_seeds_are_distinct_and_stable():
    seeds = {G.image_seed(0, p, s) for p in range(50) for s in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert G.image_seed(0, 3, 1) == G.image_seed(0, 3, 1) != G.image_seed(1, 3, 1)


def test_generation_is_resumable(tmp_path):
    prompts = ["a red apple", "a blue car", "a green tree"]
    folder = G.ImageFolder(str(tmp_path / "gen"))
    f1 = FakeFactory()
    s1 = G.generate_missing(folder, prompts, 2, 0, f1, batch_size=4, identity={"k": 1})
    assert (s1["total"], s1["generated"], s1["reused"]) == (6, 6, 0) and f1.built[0].images == 6
    first = folder_bytes(folder.url)
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert [(r["prompt_idx"], r["sample_idx"]) for r in manifest["items"]] == G.work_items(3, 2)
    assert all(r["sha256"] == hashlib.sha256(first[Path(r["file"]).name]).hexdigest() for r in manifest["items"])
    lines = [json.loads(l) for l in (tmp_path / "gen" / "prompts.jsonl").read_text().splitlines()]
    assert [l["prompt"] for l in lines] == prompts

    f2 = FakeFactory()
    s2 = G.generate_missing(folder, prompts, 2, 0, f2, batch_size=4, identity={"k": 1})
    assert (s2["generated"], s2["reused"]) == (0, 6) and f2.built == []  # nothing generated, no model loaded
    assert s2["manifest_sha256"] == s1["manifest_sha256"]

    (tmp_path / "gen" / "images" / "00001_001.png").unlink()  # an interrupted run: one image missing
    f3 = FakeFactory()
    s3 = G.generate_missing(folder, prompts, 3, 0, f3, batch_size=4, identity={"k": 1})  # and one more per prompt
    assert (s3["generated"], s3["reused"]) == (4, 5) and f3.built[0].images == 4
    after = folder_bytes(folder.url)
    assert {k: after[k] for k in first} == first
    with pytest.raises(ValueError, match="different settings"):
        G.generate_missing(folder, prompts, 2, 0, FakeFactory(), batch_size=4, identity={"k": 2})


@pytest.mark.ray
@pytest.mark.slow
def test_images_do_not_depend_on_batch_size_or_actor_layout(tmp_path, request):
    prompts = [f"prompt {i}" for i in range(5)]
    ref = G.ImageFolder(str(tmp_path / "b1"))
    G.generate_missing(ref, prompts, 2, 7, FakeFactory(), batch_size=1)
    for name, bs in (("b3", 3), ("b10", 10)):
        f = G.ImageFolder(str(tmp_path / name))
        G.generate_missing(f, prompts, 2, 7, FakeFactory(), batch_size=bs)
        assert folder_bytes(f.url) == folder_bytes(ref.url)
    request.getfixturevalue("ray_session")  # the session's shared Ray runtime, workers see the repo on PYTHONPATH
    f = G.ImageFolder(str(tmp_path / "ray"))
    st = G.generate_missing(f, prompts, 2, 7, FakeFactory(), batch_size=3,
                            distribute=G.DistributeConfig(backend="ray", num_actors=2))
    assert st["generated"] == 10
    assert folder_bytes(f.url) == folder_bytes(ref.url)


def test_metric_source_holds_exactly_the_suite_items(tmp_path):
    from tessera.evaluation.suite import items_source

    folder = G.ImageFolder(str(tmp_path / "gen"))
    G.generate_missing(folder, ["a", "b", "c"], 3, 0, FakeFactory(), batch_size=4)  # an earlier, larger suite
    items = G.work_items(2, 2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = items_source(folder, items, scratch)
    assert len(src) == 4 and not src.failures
    assert [np.asarray(im).tobytes() for im in src] == [np.asarray(folder.read_image(it)).tobytes() for it in items]


# --------------------------------------------------------------------------- the whole suite on a fake model


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory) -> Path:
    """Four emoji PNGs: the FID reference set (small: the real Inception costs seconds per image here)."""
    from tests.evaluation.conftest import render_emoji

    root = tmp_path_factory.mktemp("ref")
    for i, img in enumerate(render_emoji(4)):
        img.save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory) -> Path:
    """One reference-statistics cache for the module, so the reference is featurised once."""
    return tmp_path_factory.mktemp("fid_stats")


def suite_config(tmp_path: Path, reference: Path, stats: Path, **over) -> EvalSuiteConfig:
    """quick.yaml shrunk to 2 prompts x 2 images, with a colourfulness reward and offline W&B."""
    ov = [f"output={tmp_path / 'out'}", f"fid.reference={reference}", f"fid.stats_cache={stats}",
          "prompts.limit=2", "sampling.images_per_prompt=2", "sampling.batch_size=3", "kid.subsets=10",
          "tracking.mode=offline", "rewards=[{name: colorfulness}]"]
    return load_suite(QUICK, ov + [f"{k}={v}" for k, v in over.items()])


def fake_checkpoints(monkeypatch, tmp_path: Path, steps: list[int]) -> list[str]:
    """Checkpoint dirs with weight files, resolved by a patched ``checkpoint_info``; a fake generator."""
    import tessera.evaluation.suite as S

    infos = {}
    for st in steps:
        d = tmp_path / "ckpts" / f"step_{st:09d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(f"raw {st}".encode())
        (d / "ema.safetensors").write_bytes(f"ema {st}".encode())
        infos[str(d)] = CheckpointInfo(given=str(d), url=str(d), kind="checkpoint", step=st, samples=st * 8,
                                       sampler={"name": "euler", "steps": 28, "cfg_scale": 4.5}, size=(32, 32),
                                       weights={f: str(d / f) for f in ("model.safetensors", "ema.safetensors")})
    monkeypatch.setattr(S, "checkpoint_info", lambda c: infos[c])
    monkeypatch.setattr(S, "CheckpointFactory", FakeFactory)
    return list(infos)


def check_outputs(out: Path, cfg: EvalSuiteConfig, n_ckpt: int, metrics: tuple[str, ...], steps: int = 20,
                  n_images: int = 4) -> dict:
    combined = json.loads((out / "metrics.json").read_text())
    assert combined["suite"]["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert combined["suite"]["config_hash"] == config_hash(cfg)
    assert len(combined["checkpoints"]) == n_ckpt and len(combined["prompts"]["list"]) == cfg.prompts.limit
    for ck in combined["checkpoints"]:
        per = json.loads((out / ck["label"] / "metrics.json").read_text())
        assert per["suite"]["config_hash"] == config_hash(cfg)
        for m in metrics:
            assert np.isfinite(per["metrics"][m]), m
        w = per["checkpoint"]["weights_sha256"]
        assert per["checkpoint"]["weights_used"] == "ema.safetensors"
        assert w["ema.safetensors"] == hashlib.sha256(Path(per["checkpoint"]["url"], "ema.safetensors")
                                                      .read_bytes()).hexdigest()
        assert per["prompts"]["sha256"] == combined["prompts"]["sha256"] and per["prompts"]["n"] == cfg.prompts.limit
        ref = per["reference"]
        if cfg.fid.enabled:
            assert ref["n"] == 4 and len(ref["stats_sha256"]) == 64 and ref["network"]["sha256"]
            assert ref["preprocess"]["resize"].startswith("PIL BICUBIC 299x299") and ref["cache_key"]
        else:
            assert ref is None
        gen = per["generation"]
        assert gen["total"] == n_images and gen["spec"]["sampler"]["steps"] == steps and gen["spec"]["precision"] == "fp32"
        scores = [json.loads(l) for l in (out / ck["label"] / "scores.jsonl").read_text().splitlines()]
        assert len(scores) == n_images and all("reward/colorfulness" in s and s["prompt"] for s in scores)
    assert list(out.glob("tracking/*/wandb/offline-run-*/run-*.wandb"))
    (table,) = out.glob("tracking/*/wandb/offline-run-*/files/media/table/eval/samples_*.table.json")
    t = json.loads(table.read_text())
    assert t["columns"][:6] == ["checkpoint", "step", "prompt_idx", "sample_idx", "prompt", "image"]
    assert "reward/colorfulness" in t["columns"] and len(t["data"]) == n_ckpt * n_images
    return combined


class _HTMLCheck(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1


@pytest.mark.slow
def test_suite_on_fake_model_writes_metrics_report_and_wandb(tmp_path, monkeypatch, reference_folder, stats_dir,
                                                             tiny_clip):
    from tessera.evaluation.suite import run_suite

    arch, ckpt = tiny_clip
    # FID/KID are covered end to end below; here the real Inception would only cost CPU time.
    cfg = suite_config(tmp_path, reference_folder, stats_dir, **{
        "clip_score.enabled": "true", "clip_score.arch": arch, "clip_score.checkpoint": str(ckpt),
        "fid.enabled": "false", "kid.enabled": "false"})
    ckpts = fake_checkpoints(monkeypatch, tmp_path, [200, 100])
    res = run_suite(cfg, ckpts)
    out = tmp_path / "out"
    combined = check_outputs(out, cfg, 2, ("clip_score", "reward/colorfulness"))
    assert [c["generation"]["generated"] for c in combined["checkpoints"]] == [4, 4]
    assert [c["checkpoint"]["step"] for c in combined["checkpoints"]] == [200, 100]  # given order kept
    assert res["report"] == str(out / "report.html")
    page = (out / "report.html").read_text()
    parser = _HTMLCheck()
    parser.feed(page)
    assert parser.tags["img"] == 2 * 2 * 2 and parser.tags["svg"] == 2  # ckpts x prompts x samples; clip, reward
    assert "data:image/png;base64," in page and "step_000000100" in page and "src=\"http" not in page

    # Rerun: every image is reused, the scores are the same.
    again = run_suite(cfg, ckpts)
    assert [c["generation"]["generated"] for c in again["checkpoints"]] == [0, 0]
    assert [c["metrics"] for c in again["checkpoints"]] == [c["metrics"] for c in combined["checkpoints"]]


def test_report_renders_single_checkpoint_without_plots(tmp_path, monkeypatch, reference_folder, stats_dir):
    from tessera.evaluation.report import render_report
    from tessera.evaluation.suite import run_suite

    cfg = suite_config(tmp_path, reference_folder, stats_dir, **{"fid.enabled": "false", "kid.enabled": "false",
                                                      "tracking.mode": "disabled"})
    run_suite(cfg, fake_checkpoints(monkeypatch, tmp_path, [5]))
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<svg" not in page and page.count("<img") == 4 and "FID disabled" in page
    assert "reward/colorfulness" in page
    assert render_report(cfg, ["p"], []).startswith("<!doctype html>")


# --------------------------------------------------------------------------- a real tiny checkpoint


def make_tiny_run(root: Path, steps: tuple[int, ...] = (100, 200)) -> Path:
    """A run dir with complete checkpoints of a 1-layer DiT (pixel space, offline MiniLM text encoder).

    Written with the trainer's own ``CheckpointManager`` in its checkpoint format; the weights are a
    random init plus noise (the DiT's zero-initialised output layer would otherwise give blank images).
    """
    import torch

    from tessera.config import dump_yaml, load_config
    from tessera.tracking import Run
    from tessera.trainer.checkpoint import CheckpointManager
    from tessera.trainer.config import TrainJobConfig

    cfg = load_config(TrainJobConfig, REPO / "configs" / "train" / "tiny_dit.yaml", [
        f"run.root={root.parent}", f"run.id={root.name}", "model.dit.hidden_size=32", "model.dit.depth=1",
        "model.dit.num_heads=2", "model.dit.base_size=8", "samples.height=16", "samples.width=16",
        "samples.sampler.steps=4"])
    Run(cfg.run)  # run.json, as a training run writes it (its W&B id groups the evaluations)
    torch.manual_seed(0)
    weights = {k: v.detach().clone() for k, v in cfg.model.build().state_dict().items()}
    mgr = CheckpointManager(str(root / "checkpoints"), keep_last=5)
    for i, step in enumerate(steps):
        url = mgr.prepare(step)
        noisy = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in weights.items()}
        mgr.write_tensors(url + "/model.safetensors", noisy)
        mgr.write_tensors(url + "/ema.safetensors", {k: 0.9 * v for k, v in noisy.items()})
        mgr.write_json(url + "/trainer_state.json", {"trainer": {"step": step, "samples": step * 16}})
        Path(url, "config.yaml").write_text(dump_yaml(cfg))
        mgr.commit(step)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


def test_checkpoint_info_of_a_run_and_its_export(tiny_run, tmp_path):
    from tessera.evaluation.checkpoints import checkpoint_info, unique_labels, weights_used
    from tessera.trainer.export import export

    ck = checkpoint_info(str(tiny_run))  # a run dir: its newest complete checkpoint
    assert (ck.kind, ck.step, ck.samples, ck.size) == ("checkpoint", 200, 3200, (16, 16))
    assert ck.url.endswith("step_000000200") and ck.sampler["steps"] == 4
    assert sorted(ck.weights) == ["ema.safetensors", "model.safetensors"]
    assert (weights_used(ck, True), weights_used(ck, False)) == ("ema.safetensors", "model.safetensors")

    ex = checkpoint_info(export(ck.url, str(tmp_path / "export")))
    assert (ex.kind, ex.step, ex.samples, ex.size, ex.sampler) == ("export", 200, 3200, (16, 16), ck.sampler)
    assert sorted(ex.weights) == ["ema/model.safetensors", "raw/model.safetensors"]
    assert (weights_used(ex, True), weights_used(ex, False)) == ("ema/model.safetensors", "raw/model.safetensors")
    assert unique_labels([ck, ex]) == ["step_000000200", "export"]
    # The same dir name twice: prefixed by the parent, then numbered when still equal.
    assert unique_labels([ck, ex, ck]) == ["checkpoints-step_000000200", "export", "checkpoints-step_000000200-2"]


@pytest.mark.slow
def test_real_model_images_do_not_depend_on_batching(tiny_run):
    spec = G.SamplingSpec(sampler={"name": "dpmpp_2m", "steps": 3, "cfg_scale": 3.0}, height=16, width=16,
                          precision="fp32")
    gen = G.CheckpointFactory(str(tiny_run), spec, device="cpu")()
    prompts, seeds = ["a red apple", "a blue car on a long road", "a tree"], [11, 22, 33]
    together = [np.asarray(im, np.int16) for im in gen(prompts, seeds)]
    alone = [np.asarray(gen([p], [s])[0], np.int16) for p, s in zip(prompts, seeds)]
    assert together[0].shape == (16, 16, 3)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(together, alone))  # equal up to float rounding
    assert np.abs(together[0] - np.asarray(gen([prompts[0]], [12])[0], np.int16)).max() > 10  # seeds matter


def test_suite_guidance_interval_reaches_the_sampler(tiny_run):
    # A suite's guidance_interval overrides the checkpoint's sampler and changes which steps are guided.
    from tessera.evaluation.config import SamplingConfig, resolve_spec

    base = {"name": "euler", "steps": 4, "cfg_scale": 3.0}
    images = {}
    for name, over in [("every", {}), ("whole", {"guidance_interval": [0.0, 1.0]}),
                       ("middle", {"guidance_interval": [0.3, 0.9]}), ("none", {"guidance_interval": [0.95, 0.99]}),
                       ("cfg1", {"cfg_scale": 1.0})]:
        spec = resolve_spec(SamplingConfig(**over), base, (16, 16))
        assert spec.sampler["guidance_interval"] == over.get("guidance_interval")
        gen = G.CheckpointFactory(str(tiny_run), spec, device="cpu")()
        images[name] = np.asarray(gen(["a red apple"], [7])[0], np.int16)
    assert np.array_equal(images["every"], images["whole"])  # [0, 1] holds every step
    assert np.array_equal(images["none"], images["cfg1"])  # no step inside: the conditional model alone
    assert np.abs(images["middle"] - images["every"]).max() > 0 and np.abs(images["middle"] - images["cfg1"]).max() > 0
    with pytest.raises(Exception, match="guidance_interval"):
        resolve_spec(SamplingConfig(guidance_interval=[0.8, 0.2]), base, (16, 16))


def test_sample_command_takes_a_guidance_interval(tiny_run, tmp_path):
    from tessera.cli import main

    def grid(*extra):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", "a red apple", "--steps", "4",
                     "--sampler", "euler", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out).convert("RGB"), np.int16)

    guided, none, cfg1 = grid("--cfg", "3"), grid("--cfg", "3", "--guidance-interval", "0.95", "0.99"), grid("--cfg", "1")
    assert np.array_equal(none, cfg1) and np.abs(guided - cfg1).max() > 0


@pytest.mark.slow
def test_end_to_end_eval_of_tiny_checkpoints(tmp_path, tiny_run, reference_folder, stats_dir):
    from tessera.evaluation.cli import main

    ov = [f"output={tmp_path / 'out'}", f"fid.reference={reference_folder}", f"fid.stats_cache={stats_dir}",
          "prompts.limit=1", "sampling.images_per_prompt=2", "sampling.steps=4", "kid.subsets=10",
          "tracking.mode=offline", "rewards=[{name: colorfulness}]"]
    # One checkpoint (the run dir -> its newest): each FID costs two 2048-d eigendecompositions on this CPU;
    # several checkpoints and the metric-vs-step plots are covered by the fake-model suite test above.
    assert main(["eval", "--config", str(QUICK), "--checkpoint", str(tiny_run), *ov]) == 0
    out = tmp_path / "out"
    combined = check_outputs(out, load_suite(QUICK, ov), 1, ("fid", "kid", "kid_std", "reward/colorfulness"), steps=4,
                             n_images=2)
    ck = combined["checkpoints"][0]
    assert ck["checkpoint"]["step"] == 200 and ck["label"] == "step_000000200"
    assert ck["generation"]["spec"]["sampler"]["name"] == "euler"  # the checkpoint's own sampler
    assert ck["metrics"]["fid"] > 0 and ck["metrics"]["kid_subset_size"] == 2
    page = (out / "report.html").read_text()
    assert page.count("<img") == 2 and "<svg" not in page and "stats_sha256" in page
    assert combined["wandb"]["mode"] == "offline" and combined["wandb"]["sync"].startswith("wandb sync ")
    # W&B: grouped with the training run, as job_type eval, with the evaluated checkpoint as its input artifact.
    from tests import wandb_records

    train_id = json.loads((tiny_run / "run.json").read_text())["wandb_id"]
    (eval_dir,) = out.glob("tracking/*")
    recs = wandb_records.records(eval_dir)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type) == (train_id, "eval")
    assert any(r.artifact.name == f"model-{train_id}" and r.artifact.use_after_commit for r in recs
               if r.WhichOneof("record_type") == "artifact")
    assert [h["samples"] for h in wandb_records.history(eval_dir) if "eval/fid" in h] == [3200]


@pytest.mark.slow
def test_in_training_evaluation_logs_metrics(tmp_path, tiny_run, reference_folder, stats_dir):
    import torch

    from tessera.evaluation.in_training import evaluate_weights
    from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig
    from tessera.trainer.inference import load_for_sampling

    model, te, ae, obj, smp, size = load_for_sampling(str(tiny_run), device=torch.device("cpu"))
    run = Run(RunConfig(root=str(tmp_path), id="train"))
    tracker = Tracker(TrackingConfig(mode="disabled"), run)
    cfg = load_suite(QUICK, [f"fid.reference={reference_folder}", f"fid.stats_cache={stats_dir}", "prompts.limit=1",
                             "sampling.steps=2", "kid.subsets=5", "rewards=[{name: colorfulness}]"])
    model.train()
    m = evaluate_weights(model, te, ae, obj, cfg, step=7, tracker=tracker, sampler_cfg=smp, size=size)
    assert model.training  # restored after sampling
    assert m["n_images"] == 2 and np.isfinite(m["fid"]) and np.isfinite(m["kid"])
    assert m["kid_mean"] == m["kid"]  # torchmetrics' name, as an alias
    rows = [json.loads(l) for l in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 7 and rows[-1]["eval/quick/fid"] == m["fid"]
    assert "eval/quick/reward/colorfulness" in rows[-1]


# --------------------------------------------------------------------------- prompt adherence in suites


@pytest.fixture(scope="module")
def shapes_classifier(tmp_path_factory) -> Path:
    """A real (briefly trained) classifier of drawn shapes whose label prompts also name a colour."""
    from tessera.evaluation.classifier import TrainClassifierConfig, train_classifier
    from tests.evaluation.test_classifier import shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    data = shapes_dataset(root, per_class=10, label_in_json=True)
    train_classifier(str(data), str(root / "clf"), prompt_template="a red {label}",
                     config=TrainClassifierConfig(epochs=2))
    return root / "clf"


def test_suite_measures_classifier_accuracy_and_colour_adherence(tmp_path, monkeypatch, reference_folder, stats_dir,
                                                                 shapes_classifier):
    from tessera.evaluation.suite import run_suite

    cfg = suite_config(tmp_path, reference_folder, stats_dir, **{
        "fid.enabled": "false", "kid.enabled": "false", "tracking.mode": "disabled", "classifier.enabled": "true",
        "classifier.path": str(shapes_classifier), "colour.enabled": "true"})
    res = run_suite(cfg, fake_checkpoints(monkeypatch, tmp_path, [10]))
    assert res["prompts"]["list"] == ["a red circle", "a red square", "a red triangle"]  # the label prompts
    (ck,) = res["checkpoints"]
    m = ck["metrics"]
    assert m["classifier_scored"] == 6 and 0 <= m["classifier_accuracy"] <= 1
    assert m["classifier_holdout_accuracy"] == json.loads((shapes_classifier / "config.json").read_text())[
        "holdout_accuracy"]
    assert {f"classifier_accuracy/{s}" for s in ("circle", "square", "triangle")} <= set(m)
    assert m["colour_scored"] == 6 and 0 <= m["colour_adherence"] <= 1
    conf = ck["adherence"]["classifier"]["confusion"]
    assert [sum(row) for row in conf] == [2, 2, 2]  # two images per prompted label
    assert sum(sum(v.values()) for v in ck["adherence"]["colour"]["confusion"].values()) == 6
    scores = [json.loads(line) for line in (tmp_path / "out" / ck["label"] / "scores.jsonl").read_text().splitlines()]
    assert all(s["classifier_label"] in ("circle", "square", "triangle") and "dominant_colour" in s for s in scores)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Prompt adherence" in page and "prompted \\ predicted" in page and "colour adherence" in page
    with pytest.raises(ConfigError, match="classifier.path is required"):
        load_suite(QUICK, ["classifier.enabled=true"]).check()


@pytest.mark.slow
def test_in_training_evaluation_logs_adherence(tmp_path, tiny_run, shapes_classifier):
    import torch

    from tessera.evaluation.in_training import evaluate_weights
    from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig
    from tessera.trainer.inference import load_for_sampling

    model, te, ae, obj, smp, size = load_for_sampling(str(tiny_run), device=torch.device("cpu"))
    tracker = Tracker(TrackingConfig(mode="disabled"), Run(RunConfig(root=str(tmp_path), id="train")))
    cfg = load_suite(QUICK, ["fid.enabled=false", "kid.enabled=false", "sampling.steps=2", "classifier.enabled=true",
                             f"classifier.path={shapes_classifier}", "colour.enabled=true", "name=adherence"])
    m = evaluate_weights(model, te, ae, obj, cfg, step=3, tracker=tracker, sampler_cfg=smp, size=size)
    assert m["n_images"] == 6 and m["classifier_scored"] == 6 and m["colour_scored"] == 6
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["eval/adherence/classifier_accuracy"] == m["classifier_accuracy"]
    assert "eval/adherence/colour_adherence" in rows[-1]
