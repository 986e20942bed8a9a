"""The quickstart's optional control stage (``tessera quickstart --control``): a ControlNet on the quickstart model.

After the base model has trained (and its final FID is in), three steps, each recorded in ``quickstart.json`` under
``control`` so a rerun skips what is done:

1. conditions  Canny edges (``tessera data condition``, ``configs/quickstart/control_condition.yaml``) next to every
               training sample (``<out>/data/train_minilm`` -> ``train_minilm_canny``, its MiniLM embeddings kept)
               and next to a control set of held-out square images (``holdout_control`` -> ``holdout_canny``);
2. train       a DiT control branch (PixArt's ControlNet-Transformer) on the frozen quickstart model, its last
               checkpoint's EMA weights, for ``--control-minutes`` (``control_train.yaml``);
3. evaluate    control adherence on the held-out conditions: Canny edge F1 of the generated images against their
               conditions, beside the same branch at scale 0 (the floor: the base model) and the real images (the
               ceiling), by the evaluation suite's control set (``control_eval.yaml``).

The branch is tied to the base checkpoint it was trained on (a fingerprint is checked): its run is
``runs/control_step<N>`` for base step N, so a quickstart that trained further gets a new branch.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections import Counter
from pathlib import Path

from tessera import __version__, storage
from tessera.config import dump_yaml, from_dict, load_config

STEPS = ("conditions", "train", "evaluate")


class ControlPaths:
    """Where the control stage's outputs land (the branch's run and evaluation are per base step)."""

    def __init__(self, paths, base_step: int) -> None:
        data = paths.out / "data"
        self.train_data = data / "train_minilm_canny"
        self.holdout_data = data / "holdout_control"
        self.holdout_cond = data / "holdout_canny"
        self.run = paths.runs / f"control_step{base_step}"
        self.config = paths.out / "configs" / "control_train.yaml"
        self.eval = paths.eval / f"control_step{base_step}"


@contextlib.contextmanager
def _step(state, rec: dict, name: str, title: str):
    """Print a header, time the block, record it (with what the block adds) in ``rec`` and the stage timings."""
    from tessera.quickstart.run import fmt_s, say

    i = f"[control {STEPS.index(name) + 1}/{len(STEPS)}]"
    say(f"{i} {name}: {title}")
    info: dict = {}
    t0 = time.perf_counter()
    yield info
    seconds = round(time.perf_counter() - t0, 1)
    rec["steps"][name] = {"seconds": seconds, **info}
    state.data["stages"][f"control_{name}"] = {"seconds": seconds}
    state.save()
    say(f"{i} {name}: done in {fmt_s(seconds)}")


def run_control(opts, paths, state) -> dict:
    """Run (or resume) the control stage on the quickstart's newest checkpoint; returns its record."""
    from tessera.evaluation.config import load_suite
    from tessera.quickstart.run import checkpoint_state, fmt_s, say

    base = checkpoint_state(paths.run)
    if base is None:
        raise RuntimeError(f"the control stage needs the quickstart's base model: no checkpoint in {paths.run}")
    rec = state.data.get("control") or {}
    if rec.get("base_step") != base["step"]:  # a new base: a new branch (the data steps carry over)
        rec = {"base_step": base["step"], "base": base["url"], "steps": {k: v for k, v in rec.get("steps", {}).items()
                                                                          if k == "conditions"}}
    state.data["control"] = rec
    cp = ControlPaths(paths, base["step"])
    suite = load_suite(Path(opts.configs) / "control_eval.yaml", [f"output={cp.eval}"])
    if "conditions" in rec["steps"]:
        say(f"[control 1/3] conditions: already done ({fmt_s(rec['steps']['conditions']['seconds'])}), skipping")
    else:
        with _step(state, rec, "conditions", f"Canny edges -> {cp.train_data}, {cp.holdout_cond}") as info:
            info.update(make_conditions(opts, paths, cp, suite.control.n))
    if "train" in rec["steps"]:
        say(f"[control 2/3] train: already done ({fmt_s(rec['steps']['train']['seconds'])}), skipping")
    else:
        with _step(state, rec, "train", f"{opts.control_minutes:g} min on {opts.nproc} rank(s), base step "
                                        f"{base['step']} -> {cp.run}") as info:
            info.update(train_branch(opts, paths, cp, base["url"]))
    if "evaluate" in rec["steps"]:
        say(f"[control 3/3] evaluate: already done ({fmt_s(rec['steps']['evaluate']['seconds'])}), skipping")
    else:
        n = rec["steps"]["conditions"]["held_out"]["samples"]
        suite = load_suite(Path(opts.configs) / "control_eval.yaml",
                           [f"output={cp.eval}", f"control.dataset={cp.holdout_cond}",
                            f"control.n={min(n, suite.control.n)}"])
        with _step(state, rec, "evaluate", f"control adherence of {cp.run.name} on {min(n, suite.control.n)} "
                                           "held-out conditions") as info:
            info.update(evaluate_branch(suite, cp))
            a = info["adherence"]
            say(f"  {a['metric']}: {a['value']:.3f} with control, {_f(a['floor'])} without (floor), "
                f"{_f(a['ceiling'])} for the real images (ceiling)")
    return rec


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- 1. conditions


def write_holdout_dataset(items, out: Path) -> int:
    """The control set's held-out samples as a one-shard ``tessera-shards/1`` dataset (``tessera data condition``
    reads datasets; the split wrote the held-out images as files). Written once: its manifest pins the conditions."""
    from tessera.data_pipeline.manifest import FORMAT
    from tessera.data_pipeline.shards import TarShardWriter, read_json, sample_members, write_json

    if (out / "manifest.json").exists():
        return read_json(str(out / "manifest.json"))["totals"]["written"]
    name, buckets = "shards/00000.tar", Counter(h.bucket for h in items)
    with storage.atomic_write(str(out / name)) as f:
        writer = TarShardWriter(f)
        for h in items:
            writer.add_sample(sample_members(h.key, Path(h.file).read_bytes(), Path(h.file).suffix[1:], h.caption,
                                             {"bucket": h.bucket, "source": h.source}))
        sha, nbytes = writer.close()
    n = len(items)
    write_json(str(out / "manifest.json"), {
        "format": FORMAT, "tessera_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_config_hash": None, "output_config_hash": None, "config": {"quickstart_control_set": {"n": n}},
        "shards": [{"name": name, "sha256": sha, "bytes": nbytes, "samples": n, "input": n, "buckets": dict(buckets)}],
        "totals": {"input": n, "written": n, "rejected": 0}, "reasons": {}, "buckets": dict(sorted(buckets.items())),
        "retries": 0, "lineage": {"source": str(Path(items[0].file).parent.parent) if items else None,
                                  "source_manifest_sha256": None},
        "caches": {"emb": [], "latent": []}})
    return n


def make_conditions(opts, paths, cp: ControlPaths, n_held: int) -> dict:
    """Condition the training dataset and the control set (the first ``n_held`` square held-out images, spread over
    the sources as the grids pick them); returns what each condition job wrote."""
    from tessera.data_pipeline.condition import run_condition
    from tessera.data_pipeline.condition_config import ConditionJobConfig
    from tessera.quickstart.data import load_holdout, pick_prompts
    from tessera.quickstart.run import say

    held = pick_prompts(load_holdout(str(paths.holdout)), n_held)
    if not held:
        raise RuntimeError(f"the control stage found no square held-out image in {paths.holdout}")
    write_holdout_dataset(held, cp.holdout_data)
    out = {}
    for key, src, dst in (("train", paths.precomputed, cp.train_data), ("held_out", cp.holdout_data, cp.holdout_cond)):
        cfg = load_config(ConditionJobConfig, Path(opts.configs) / "control_condition.yaml",
                          [f"source={src}", f"output={dst}"])
        m = run_condition(cfg)
        name = next(iter(cfg.conditions))
        counts = {k: v for k, v in m["conditions"][name].items() if k not in ("member", "annotator")}
        out[key] = {"condition": name, "samples": m["condition"]["samples"], **counts}
        say(f"  {key}: {counts.get('written', 0)} {name} conditions of {m['condition']['samples']} samples"
            + (f", not written: {dict((k, v) for k, v in counts.items() if k != 'written')}"
               if len(counts) > 1 else ""))
    return out


# --------------------------------------------------------------------------- 2. train


def control_train_config(opts, paths, cp: ControlPaths, base_url: str):
    """``control_train.yaml`` with this quickstart's paths and base checkpoint; written to ``<out>/configs``."""
    from tessera.trainer.config import TrainJobConfig

    cfg = load_config(TrainJobConfig, Path(opts.configs) / "control_train.yaml", [f"model.init_from={base_url}"])
    cfg.run.root, cfg.run.id = str(paths.runs), cp.run.name
    cfg.data.path = [str(cp.train_data)]
    if not opts.recaption:  # as the base trained: the recaption stage's variant is not in the dataset
        cfg.data.caption_variants = {"alt": 1.0}
    cp.config.parent.mkdir(parents=True, exist_ok=True)
    cp.config.write_text(dump_yaml(cfg))
    return cfg


def train_branch(opts, paths, cp: ControlPaths, base_url: str) -> dict:
    """Train the branch for ``opts.control_minutes`` (a rerun of an interrupted launch resumes its checkpoint)."""
    from tessera.quickstart.run import checkpoint_state, say
    from tessera.trainer.launch import spawn_local

    control_train_config(opts, paths, cp, base_url)
    t0 = time.perf_counter()
    code = spawn_local(["train", "--config", str(cp.config), f"train.max_minutes={opts.control_minutes}"], opts.nproc)
    if code != 0:
        raise RuntimeError(f"control training exited with code {code}; see {cp.run / 'logs'}")
    ck = checkpoint_state(cp.run)
    if ck is None:
        raise RuntimeError(f"control training wrote no checkpoint in {cp.run}")
    say(f"  branch: step {ck['step']}, {ck['samples']:,} samples")
    return {"minutes": opts.control_minutes, "step": ck["step"], "samples": ck["samples"], "checkpoint": ck["url"],
            "wall_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- 3. evaluate


def evaluate_branch(suite, cp: ControlPaths) -> dict:
    """The suite's control adherence of the branch's newest checkpoint (generated, floor, ceiling)."""
    from tessera.evaluation.suite import run_suite

    combined = run_suite(suite, [str(cp.run)])
    c = combined["checkpoints"][0]["adherence"]["control"]
    return {"adherence": {k: c.get(k) for k in ("metric", "higher_is_better", "condition", "n", "value", "floor",
                                                 "ceiling")}, "output": str(cp.eval)}


# --------------------------------------------------------------------------- report


def suite_results(output: str) -> tuple:
    """(suite config, per-checkpoint results with their per-image scores) read back from a suite's output."""
    from tessera.evaluation.config import EvalSuiteConfig

    combined = json.loads(storage.read_text(storage.join(output, "metrics.json")))
    cfg = from_dict(EvalSuiteConfig, combined["suite"]["config"], f"{output}/metrics.json")
    results = []
    for r in combined["checkpoints"]:
        rows = storage.read_text(storage.join(output, r["label"], "scores.jsonl")).splitlines()
        results.append(dict(r, per_image=[json.loads(line) for line in rows if line.strip()]))
    return cfg, results


def control_adherence(data: dict) -> dict | None:
    """The control stage's adherence figures from ``quickstart.json`` (metric, value, floor, ceiling), or None."""
    return (((data.get("control") or {}).get("steps") or {}).get("evaluate") or {}).get("adherence")


def control_section(data: dict) -> list:
    """The report's control stage: conditions, branch training, and adherence vs floor and ceiling, then
    condition | generated | no control | real for the first held-out conditions ([] without the stage)."""
    from tessera import report as R
    from tessera.evaluation.report import control_blocks

    rec = data.get("control") or {}
    ev, tr, cond = (rec.get("steps", {}).get(k) for k in ("evaluate", "train", "conditions"))
    if not (ev and tr and cond):
        return []
    a = ev["adherence"]
    suite, results = suite_results(ev["output"])
    blocks = control_blocks(suite, results)  # heading, note, table, then one row of thumbnails per condition
    return [R.el("h2", "Control: a ControlNet on the quickstart model"),
            R.el("p", f"{cond['train'].get('written', 0):,} {cond['train']['condition']} conditions of the training "
                      f"images; a DiT control branch trained {tr['minutes']:g} min ({tr['step']} steps, "
                      f"{tr['samples']:,} samples) on the frozen model of step {rec['base_step']}, evaluated on "
                      f"{a['n']} held-out conditions."),
            R.el("p", f"{a['metric']} {a['value']:.3f} with control vs {_f(a['floor'])} without (floor) and "
                      f"{_f(a['ceiling'])} for the real images (ceiling)", class_="big"),
            *blocks[:3],
            R.el("p", "Each row: the held-out condition | the image generated from it | the same prompt and seed "
                      "without control | the real image.", class_="muted"),
            *blocks[3:]]
