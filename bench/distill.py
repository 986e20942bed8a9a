"""Benchmark: few-step students distilled from the quickstart model, against the teacher, by FID at each step count.

For each method (``configs/distill/<method>.yaml``: lcm, reflow, progressive, lcm_lora) the teacher (the quickstart's
EMA weights) is distilled with ``tessera distill`` on ``--nproc`` CPU ranks for ``--samples`` samples (``--minutes``
caps it). Then, for each step count k in ``--ks`` and each sampling seed in ``--seeds``, over the held-out images of
the quickstart (``--fid-images``, at their own captions and bucket sizes), it measures FID, colour adherence and
sampling time (ms per image, Inception excluded) of:

* each student at k steps with its own sampler (guidance folded in: cfg 1, one network call per step);
* the teacher at k steps with its own sampler (``euler``, its CFG and guidance interval) and with ``euler_uniform``
  (the grid the students use: the fairer few-step teacher);
* the teacher at its full step count (its checkpoint's sampler: 20 Euler steps, CFG 4 on noise levels 0.3-1).

Medians and spread (min-max) over the seeds, the goal check (the student at 4 steps within 1.25x of the teacher's
full-step FID, below the teacher's own FID at 4 steps, colour adherence no more than 0.05 under the teacher's), and
student | teacher grids per k on the same prompts and seeds go to ``bench/results/distill[-TAG].json`` and
``<work>/report.html``.

    tessera quickstart --out /tmp/qs-distill
    OMP_NUM_THREADS=1 .venv/bin/python bench/distill.py --quickstart /tmp/qs-distill --work /tmp/bench-distill \
        --methods lcm reflow progressive --samples 40000 --minutes 12 --nproc 2 --seeds 0 1 2

A rerun reuses finished distillations (``<work>/runs/<method>/done.json``), cached real statistics and the teacher's
records (``<quickstart>/eval/fid_stats/distill_teacher_records.json``, keyed by its weights' sha256). The test
``tests/distill/test_bench.py`` runs a short form on a tiny shapes teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RESULTS, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL = {"k": 4, "fid_vs_full": 1.25, "colour_drop": 0.05}


# --------------------------------------------------------------------------- distillation


def distill(method: str, teacher: str, work: Path, samples: int, minutes: float | None, nproc: int,
            extra: list[str], config: Path | None = None) -> Path:
    """Run ``tessera distill`` for ``method`` once (a finished run is reused); returns its run directory."""
    run = work / "runs" / method
    done = run / "done.json"
    if done.exists():
        print(f"{method}: reusing {run}", flush=True)
        return run
    cfg = config or REPO / "configs" / "distill" / f"{method}.yaml"
    args = [sys.executable, "-m", "tessera.cli", "distill", "--config", str(cfg), "--checkpoint", teacher,
            "--nproc", str(nproc), f"run.root={work / 'runs'}", f"run.id={method}", f"train.total_samples={samples}",
            "tracking.mode=disabled", *extra] + ([f"train.max_minutes={minutes}"] if minutes else [])
    env = dict(os.environ, TESSERA_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    if nproc == 1:  # a single rank of its own: its own rendezvous port (29500 may be taken by a run beside it)
        from tessera.trainer.launch import free_port

        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    print(f"{method}: distilling ({' '.join(args[3:])})", flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{method}: tessera distill failed ({out.returncode}):\n{out.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    info = {"seconds": round(time.perf_counter() - t0, 1), "steps": rows[-1]["step"], "samples": rows[-1]["samples"],
            "final_loss": rows[-1]["loss"], "args": args[3:]}
    done.write_text(json.dumps(info, indent=1))
    print(f"{method}: {info['samples']} samples in {info['seconds']:.0f} s", flush=True)
    return run


# --------------------------------------------------------------------------- evaluation


def load(checkpoint: str):
    """(model, text encoder, autoencoder, objective, sampler, size) of a checkpoint's EMA weights."""
    from tessera.trainer.inference import load_for_sampling

    return load_for_sampling(checkpoint, use_ema=True)


def variants(teacher_sampler, students: dict, ks: list[int], uniform: bool = True) -> list[tuple[str, str, int, dict]]:
    """(model, label, k, sampler overrides) of every row: students at k, teacher at k (own sampler and the uniform
    grid), teacher at its full step count."""
    rows = [("teacher", "teacher full", teacher_sampler.steps, {})]
    for k in ks:
        rows.append(("teacher", "teacher", k, {"steps": k}))
        if uniform and teacher_sampler.name == "euler":
            rows.append(("teacher", "teacher euler_uniform", k, {"steps": k, "name": "euler_uniform"}))
        rows += [(name, name, k, {"steps": k}) for name in students]
    return rows


def evaluate(teacher: str, students: dict[str, str], holdout: Path, cache: Path, ks: list[int], seeds: list[int],
             n_images: int | None, batch_size: int = 32, uniform: bool = True) -> list[dict]:
    """One record per (row of ``variants``, seed): FID, colour adherence, ms per image."""
    import dataclasses

    from tessera.quickstart.evaluate import FID
    from tessera.trainer.models.pinned import weights_fingerprint

    fid = FID(holdout, cache, n_images, batch_size, seeds[0])
    models = {"teacher": load(teacher), **{name: load(url) for name, url in students.items()}}
    # The teacher's rows depend only on its weights, the sampler, the seed and the held-out set: kept across runs
    # (keyed by the weights' sha256) so that measuring another student does not re-measure the teacher.
    known_path = cache / "distill_teacher_records.json"
    known = json.loads(known_path.read_text()) if known_path.exists() else {}
    teacher_key = weights_fingerprint(models["teacher"][0]).hex()[:16]
    out = []
    for model_name, label, k, over in variants(models["teacher"][4], students, ks, uniform):
        model, te, ae, obj, smp, _ = models[model_name]
        smp = dataclasses.replace(smp, **over)
        for seed in seeds:
            key = f"{teacher_key}|{label}|{smp.name}|{k}|{seed}|{n_images}" if model_name == "teacher" else None
            rec = known.get(key)
            if rec is None:
                fid.seed = seed
                r = fid(model, te, ae, smp, obj)
                rec = {"model": label, "k": k, "seed": seed, "sampler": smp.name, "cfg_scale": smp.cfg_scale,
                       "fid": r["fid"], "colour_adherence": r["colour_adherence"], "n": r["n"],
                       "ms_per_image": round(1000 * r["sample_s"] / max(r["n"], 1), 2)}
                if key is not None:
                    known[key] = rec
                    known_path.write_text(json.dumps(known, indent=1))
            out.append(rec)
            print(f"  {label:24s} k={k:<3d} seed {seed}: FID {rec['fid']:7.2f}  colour "
                  f"{rec['colour_adherence'] if rec['colour_adherence'] is not None else float('nan'):.3f}  "
                  f"{rec['ms_per_image']:.1f} ms/image", flush=True)
    return out


def summarise(records: list[dict]) -> list[dict]:
    """Median and min/max over seeds per (model, k)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["k"]), []).append(r)
    out = []
    for (model, k), rs in groups.items():
        row = {"model": model, "k": k, "sampler": rs[0]["sampler"], "seeds": len(rs)}
        for key in ("fid", "colour_adherence", "ms_per_image"):
            vals = [r[key] for r in rs if r[key] is not None]
            if vals:
                row[key] = statistics.median(vals)
                row[f"{key}_min"], row[f"{key}_max"] = min(vals), max(vals)
        out.append(row)
    return out


def goal(summary: list[dict], students: list[str]) -> dict:
    """The issue's goal per student at k = 4 (against the better of the teacher's two few-step samplers)."""
    by = {(r["model"], r["k"]): r for r in summary}
    full = next(r for r in summary if r["model"] == "teacher full")
    k = GOAL["k"]
    teacher_k = min((by[m, k] for m in ("teacher", "teacher euler_uniform") if (m, k) in by), key=lambda r: r["fid"])
    out = {"teacher_full_fid": full["fid"], "teacher_k_fid": teacher_k["fid"], "teacher_k_sampler": teacher_k["sampler"],
           "teacher_full_colour": full.get("colour_adherence")}
    for s in students:
        r = by.get((s, k))
        if r is None:
            continue
        colour_ok = None if r.get("colour_adherence") is None or full.get("colour_adherence") is None else \
            r["colour_adherence"] >= full["colour_adherence"] - GOAL["colour_drop"]
        out[s] = {"fid": r["fid"], "fid_ratio_to_full": round(r["fid"] / full["fid"], 3),
                  "within_1.25x_of_full": r["fid"] <= GOAL["fid_vs_full"] * full["fid"],
                  "below_teacher_at_k": r["fid"] < teacher_k["fid"], "colour": r.get("colour_adherence"),
                  "colour_within_0.05": colour_ok}
        out[s]["met"] = bool(out[s]["within_1.25x_of_full"] and out[s]["below_teacher_at_k"] and colour_ok is not False)
    return out


def print_table(summary: list[dict]) -> None:
    """The summary as a console table."""
    print(f"\n{'model':24s} {'k':>3s} {'sampler':14s} {'FID median [min-max]':>26s} {'colour [min-max]':>22s} "
          f"{'ms/image':>9s}")
    for r in sorted(summary, key=lambda r: (r["k"], r["model"])):
        col = (f"{r['colour_adherence']:.3f} [{r['colour_adherence_min']:.2f}-{r['colour_adherence_max']:.2f}]"
               if "colour_adherence" in r else "-")
        print(f"{r['model']:24s} {r['k']:3d} {r['sampler']:14s} {r['fid']:9.2f} [{r['fid_min']:.1f}-{r['fid_max']:.1f}]"
              f"{'':4s} {col:>22s} {r['ms_per_image']:9.1f}")


# --------------------------------------------------------------------------- grids and report


def grids(teacher: str, students: dict[str, str], prompts: list[str], size: tuple[int, int], ks: list[int],
          seed: int, out: Path) -> dict[str, str]:
    """For each k: one PNG with each student's grid beside the teacher's (same prompts and seeds); returns paths."""
    import dataclasses

    from PIL import Image, ImageDraw

    from tessera.trainer.inference import generate, make_grid

    models = {"teacher": load(teacher), **{name: load(url) for name, url in students.items()}}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k in ks:
        panels = []
        for name, (model, te, ae, obj, smp, _) in models.items():
            smp_k = dataclasses.replace(smp, steps=k)
            imgs = generate(model, te, ae, smp_k, obj, prompts, height=size[0], width=size[1], seed=seed,
                            device=next(model.parameters()).device)
            grid = make_grid(imgs, ncols=len(prompts) // 2 or 1, scale=max(1, 64 // size[0]))
            label = Image.new("RGB", (grid.width, 14), "white")
            ImageDraw.Draw(label).text((2, 1), f"{name} ({smp_k.name}, {k} steps, cfg {smp_k.cfg_scale:g})",
                                       fill="black")
            panel = Image.new("RGB", (grid.width, grid.height + 14), "white")
            panel.paste(label, (0, 0))
            panel.paste(grid, (0, 14))
            panels.append(panel)
        sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), "white")
        x = 0
        for p in panels:
            sheet.paste(p, (x, 0))
            x += p.width + 8
        paths[str(k)] = str(out / f"grid_k{k}.png")
        sheet.save(paths[str(k)])
    return paths


def write_html(result: dict, path: Path) -> None:
    """A self-contained report: the goal, the table, the grids."""
    from tessera import report as R

    rows = [[r["model"], r["k"], r["sampler"], f"{r['fid']:.2f} [{r['fid_min']:.1f}-{r['fid_max']:.1f}]",
             "-" if "colour_adherence" not in r else f"{r['colour_adherence']:.3f}", f"{r['ms_per_image']:.1f}"]
            for r in sorted(result["summary"], key=lambda r: (r["k"], r["model"]))]
    body = [R.el("h1", "Few-step distillation"),
            R.el("pre", json.dumps(result["goal"], indent=1)),
            R.table(["model", "k", "sampler", "FID median [min-max]", "colour", "ms/image"], rows),
            *[R.figure(R.png_data_uri(Path(p).read_bytes()), f"k = {k}: each student | the teacher, same prompts "
                                                             f"and seeds") for k, p in result["grids"].items()]]
    path.write_text(R.page("Tessera distillation bench", body), encoding="utf-8")


def bench(teacher: str, holdout: Path, cache: Path, work: Path, methods: list[str], samples: int,
          minutes: float | None, nproc: int, ks: list[int], seeds: list[int], n_images: int | None,
          grid_prompts: list[str], grid_size: tuple[int, int], extra: dict[str, list[str]] | None = None,
          configs: dict[str, Path] | None = None, uniform: bool = True) -> dict:
    """Distil, evaluate, draw and summarise; returns the result (also written to ``<work>/result.json``)."""
    runs = {m: str(distill(m, teacher, work, samples, minutes, nproc, (extra or {}).get(m, []),
                           (configs or {}).get(m))) for m in methods}
    t0 = time.perf_counter()
    records = evaluate(teacher, runs, holdout, cache, ks, seeds, n_images, uniform=uniform)
    summary = summarise(records)
    result = {"teacher": teacher, "students": runs, "records": records, "summary": summary,
              "goal": goal(summary, list(runs)), "eval_seconds": round(time.perf_counter() - t0, 1),
              "distill": {m: json.loads((Path(u) / "done.json").read_text()) for m, u in runs.items()},
              "grids": grids(teacher, runs, grid_prompts, grid_size, ks, seeds[0], work / "grids")}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    write_html(result, work / "report.html")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", required=True, help="a finished `tessera quickstart --out DIR`")
    p.add_argument("--work", default="/tmp/bench-distill")
    p.add_argument("--methods", nargs="+", default=["lcm", "reflow", "progressive"])
    p.add_argument("--samples", type=int, default=40000, help="distillation samples per method")
    p.add_argument("--minutes", type=float, default=None, help="cap on each distillation's minutes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fid-images", type=int, default=None, help="held-out images (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a dotted override for one method's distillation, e.g. lcm:optim.lr=0.001")
    p.add_argument("--no-uniform-teacher", action="store_true",
                   help="skip the teacher's euler_uniform rows (a third fewer evaluations)")
    p.add_argument("--tag", default=None)
    a = p.parse_args()
    if len(a.seeds) < 3:
        print("warning: fewer than 3 seeds: no spread worth quoting", file=sys.stderr)
    from tessera.quickstart.data import load_holdout, pick_prompts

    qs = Path(a.quickstart)
    extra: dict[str, list[str]] = {}
    for s in a.set:
        m, kv = s.split(":", 1)
        extra.setdefault(m, []).append(kv)
    prompts = [h.caption for h in pick_prompts(load_holdout(str(qs / "data" / "holdout")), 8)]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    result = bench(str(qs / "runs" / "train"), qs / "data" / "holdout", qs / "eval" / "fid_stats", work, a.methods,
                   a.samples, a.minutes, a.nproc, a.ks, a.seeds, a.fid_images, prompts, (32, 32), extra,
                   uniform=not a.no_uniform_teacher)
    print_table(result["summary"])
    print(json.dumps(result["goal"], indent=1))
    result["machine"] = machine(["torch", "deepspeed", "diffusers"])
    result["params"] = vars(a)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"distill{'-' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps({k: v for k, v in result.items() if k != "records"} | {"records": result["records"]},
                              indent=1))
    print(f"wrote {out} and {work / 'report.html'}")


if __name__ == "__main__":
    main()
