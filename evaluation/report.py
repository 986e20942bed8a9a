"""Evaluation outputs: ``metrics.json`` (per checkpoint and combined), a self-contained HTML report, W&B.

The HTML report embeds every thumbnail as a base64 PNG and draws its plots as inline SVG, so the one
file can be copied anywhere (or opened straight from S3) and still shows everything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from typing import Any

from PIL import Image

from tessera import __version__, storage
from tessera.config import config_hash, dump_yaml, to_dict

log = logging.getLogger("tessera.eval.report")

FORMAT = "tessera-eval/1"
SCORE_KEYS_SKIP = ("n_images", "kid_subset_size", "generated_decode_failures")


# --------------------------------------------------------------------------- metrics.json


def checkpoint_record(cfg, result: dict) -> dict:
    """The per-checkpoint metrics.json content (everything but per-image scores)."""
    rec = {"format": FORMAT, "tessera_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "suite": {"name": cfg.name, "config_hash": config_hash(cfg), "config": to_dict(cfg)}}
    rec.update({k: v for k, v in result.items() if k != "per_image"})
    return rec


def write_outputs(cfg, prompts: list[str], results: list[dict], wandb_info: dict | None = None) -> dict:
    """Write per-checkpoint metrics.json + scores.jsonl, the combined metrics.json and report.html."""
    for r in results:
        base = storage.join(cfg.output, r["label"])
        storage.write_text(storage.join(base, "metrics.json"), json.dumps(checkpoint_record(cfg, r), indent=1,
                                                                          default=str))
        lines = [json.dumps(dict(row, prompt=prompts[row["prompt_idx"]]), ensure_ascii=False) for row in r["per_image"]]
        storage.write_text(storage.join(base, "scores.jsonl"), "".join(line + "\n" for line in lines))
    combined = {"format": FORMAT, "tessera_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "suite": {"name": cfg.name, "config_hash": config_hash(cfg), "config": to_dict(cfg)},
                "prompts": {"n": len(prompts), "sha256": results[0]["prompts"]["sha256"] if results else None,
                            "list": prompts},
                "wandb": wandb_info,
                "checkpoints": [{k: v for k, v in r.items() if k != "per_image"} for r in results]}
    storage.write_text(storage.join(cfg.output, "metrics.json"), json.dumps(combined, indent=1, default=str))
    if cfg.report:
        text = render_report(cfg, prompts, results)
        storage.write_text(storage.join(cfg.output, "report.html"), text)
        combined["report"] = storage.join(cfg.output, "report.html")
    return combined


# --------------------------------------------------------------------------- W&B


def log_wandb(cfg, prompts: list[str], results: list[dict]) -> dict:
    """Log metrics per checkpoint step and one table of (checkpoint, prompt, image, scores); returns run info."""
    from tessera.evaluation.generate import ImageFolder
    from tessera.tracking import Run, RunConfig, Tracker

    run = Run(RunConfig(root=storage.join(cfg.output, "tracking")))
    tracker = Tracker(cfg.tracking, run, to_dict(cfg))
    ordered = sorted(results, key=lambda r: r["checkpoint"]["step"])  # W&B drops steps that go backwards
    score_cols = sorted({k for r in results for row in r["per_image"] for k in row if k not in ("prompt_idx", "sample_idx")})
    columns = ["checkpoint", "step", "prompt_idx", "sample_idx", "prompt", "image", *score_cols]
    rows = []
    for r in ordered:
        step = r["checkpoint"]["step"]
        tracker.log({f"eval/{k}": v for k, v in r["metrics"].items()}, step=step)
        folder = ImageFolder(r["folder"])
        for row in r["per_image"][:cfg.table_rows]:
            item = (row["prompt_idx"], row["sample_idx"])
            rows.append([r["label"], step, item[0], item[1], prompts[item[0]], folder.read_image(item),
                         *[row.get(c) for c in score_cols]])
    if rows:
        tracker.log_table("eval/samples", columns, rows, step=ordered[-1]["checkpoint"]["step"])
    info = {"mode": tracker.mode, "run_dir": run.url, "run_id": run.id, "sync": tracker.sync_command()}
    tracker.finish()
    run.close()
    return info


# --------------------------------------------------------------------------- HTML


def thumbnail_b64(img: Image.Image, size: int = 128) -> str:
    """A base64 PNG thumbnail; small images are upscaled by an integer factor (nearest) to stay crisp."""
    img = img.convert("RGB")
    w, h = img.size
    if max(w, h) < size:
        k = max(1, size // max(w, h))
        img = img.resize((w * k, h * k), Image.NEAREST)
    elif max(w, h) > size:
        img = img.copy()
        img.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return html.escape(str(v))


def svg_line_plot(points: list[tuple[float, float]], title: str, width: int = 360, height: int = 220) -> str:
    """An inline SVG line plot of (x, y) points with min/max axis labels."""
    pts = sorted((float(x), float(y)) for x, y in points if y is not None and math.isfinite(float(y)))
    if not pts:
        return ""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 24, 32
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y: float) -> float:
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"><title>step {x:g}: {y:.6g}</title></circle>'
                   for x, y in pts)
    axes = (f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#888"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#888"/>')
    labels = (f'<text x="{pad_l - 4}" y="{sy(y0):.1f}" text-anchor="end" font-size="10">{y0:.4g}</text>'
              f'<text x="{pad_l - 4}" y="{sy(y1) + 8:.1f}" text-anchor="end" font-size="10">{y1:.4g}</text>'
              f'<text x="{pad_l}" y="{height - pad_b + 14}" font-size="10">{x0:g}</text>'
              f'<text x="{width - pad_r}" y="{height - pad_b + 14}" text-anchor="end" font-size="10">{x1:g}</text>'
              f'<text x="{(width + pad_l) / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="11">step</text>'
              f'<text x="{width / 2:.0f}" y="14" text-anchor="middle" font-size="12" font-weight="bold">'
              f'{html.escape(title)}</text>')
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{axes}{labels}'
            f'<path d="{path}" fill="none" stroke="#1f6feb" stroke-width="2"/>'
            f'<g fill="#1f6feb">{dots}</g></svg>')


def metric_names(results: list[dict]) -> list[str]:
    """Metric keys shown in the table and plots, in a stable order."""
    names: list[str] = []
    for r in results:
        for k in r["metrics"]:
            if k not in names:
                names.append(k)
    return names


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}
td.l{text-align:left}.row{display:flex;gap:6px;align-items:center;margin:4px 0}.row span{width:160px;font-size:12px}
img{image-rendering:pixelated;border:1px solid #ddd}pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}
.plots{display:flex;flex-wrap:wrap;gap:12px}h3{font-size:14px;margin:16px 0 4px}"""


def render_report(cfg, prompts: list[str], results: list[dict]) -> str:
    """The whole HTML report as a string (thumbnails embedded, plots as inline SVG)."""
    from tessera.evaluation.generate import ImageFolder

    names = metric_names(results)
    head = ["checkpoint", "step", "samples", "weights sha256", *names]
    rows = []
    for r in results:
        c = r["checkpoint"]
        cells = [f'<td class="l">{html.escape(r["label"])}</td>', f"<td>{c['step']}</td>", f"<td>{c['samples']}</td>",
                 f'<td class="l"><code>{c["weights_sha256"].get(c["weights_used"], "")[:12]}</code></td>']
        cells += [f"<td>{_fmt(r['metrics'].get(n, ''))}</td>" for n in names]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows)
             + "</table>")
    plots = ""
    if len(results) > 1:
        svgs = [svg_line_plot([(r["checkpoint"]["step"], r["metrics"].get(n)) for r in results], n)
                for n in names if n not in SCORE_KEYS_SKIP]
        plots = '<h2>Metrics vs step</h2><div class="plots">' + "".join(s for s in svgs if s) + "</div>"
    grids = []
    folders = [(r["label"], ImageFolder(r["folder"]), r["generation"]["images_per_prompt"]) for r in results]
    for p, prompt in enumerate(prompts[:cfg.report_max_prompts]):
        lines = [f"<h3>{p}: {html.escape(prompt)}</h3>"]
        for label, folder, n in folders:
            imgs = "".join(f'<img alt="{p}_{s}" title="{html.escape(label)} {p}_{s}" '
                           f'src="data:image/png;base64,{thumbnail_b64(folder.read_image((p, s)))}">' for s in range(n))
            lines.append(f'<div class="row"><span>{html.escape(label)}</span>{imgs}</div>')
        grids.append("".join(lines))
    ref = results[0].get("reference") if results else None
    ref_html = f"<pre>{html.escape(json.dumps(ref, indent=1, default=str))}</pre>" if ref else "<p>FID disabled.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)} evaluation</title>"
            f"<style>{_CSS}</style></head><body><h1>Evaluation: {html.escape(cfg.name)}</h1>"
            f"<p>{len(results)} checkpoint(s), {len(prompts)} prompts, config hash <code>{config_hash(cfg)[:16]}</code>, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p><h2>Metrics</h2>{table}{plots}"
            f"<h2>Samples by prompt</h2>{''.join(grids)}<h2>Reference statistics</h2>{ref_html}"
            f"<h2>Suite config</h2><pre>{html.escape(dump_yaml(cfg))}</pre></body></html>")
