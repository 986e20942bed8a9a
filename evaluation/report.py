"""Evaluation outputs: ``metrics.json`` (per checkpoint and combined), a self-contained HTML report, W&B.

The HTML report is built with ``tessera.report``: thumbnails embedded as base64 PNG, metric-vs-step plots
as inline SVG, so the one file can be copied anywhere (or opened straight from S3) and still shows everything.
"""

from __future__ import annotations

import json
import logging
import time

from tessera import __version__, storage
from tessera import report as R
from tessera.config import config_hash, dump_yaml, to_dict
from tessera.evaluation.config import EvalSuiteConfig, suite_dict
from tessera.evaluation.generate import ImageFolder
from tessera.evaluation.metrics import ITEM_KEYS
from tessera.lineage import model_input
from tessera.tracking import Run, RunConfig, Tracker

log = logging.getLogger("tessera.eval.report")

FORMAT = "tessera-eval/1"
SCORE_KEYS_SKIP = ("n_images", "kid_subset_size", "kid_mean", "generated_decode_failures", "classifier_scored",
                   "colour_scored", "classifier_holdout_accuracy")  # counts, constants and aliases: no plot
PER_CLASS_PREFIX = "classifier_accuracy/"
THUMBNAIL = 128  # pixels, longer side of a report thumbnail


# --------------------------------------------------------------------------- metrics.json


def _header(cfg: EvalSuiteConfig) -> dict:
    return {"format": FORMAT, "tessera_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "suite": suite_dict(cfg)}


def checkpoint_record(cfg: EvalSuiteConfig, result: dict) -> dict:
    """The per-checkpoint metrics.json content (everything but per-image scores)."""
    return dict(_header(cfg), **{k: v for k, v in result.items() if k != "per_image"})


def write_outputs(cfg: EvalSuiteConfig, prompts: list[str], results: list[dict], wandb_info: dict | None = None) -> dict:
    """Write per-checkpoint metrics.json + scores.jsonl, the combined metrics.json and report.html."""
    for r in results:
        base = storage.join(cfg.output, r["label"])
        storage.write_text(storage.join(base, "metrics.json"), json.dumps(checkpoint_record(cfg, r), indent=1,
                                                                          default=str))
        lines = [json.dumps(dict(row, prompt=prompts[row["prompt_idx"]]), ensure_ascii=False) for row in r["per_image"]]
        storage.write_text(storage.join(base, "scores.jsonl"), "".join(line + "\n" for line in lines))
    combined = dict(_header(cfg),
                    prompts={"n": len(prompts), "sha256": results[0]["prompts"]["sha256"] if results else None,
                             "list": prompts},
                    wandb=wandb_info,
                    checkpoints=[{k: v for k, v in r.items() if k != "per_image"} for r in results])
    storage.write_text(storage.join(cfg.output, "metrics.json"), json.dumps(combined, indent=1, default=str))
    if cfg.report:
        storage.write_text(storage.join(cfg.output, "report.html"), render_report(cfg, prompts, results))
        combined["report"] = storage.join(cfg.output, "report.html")
    return combined


# --------------------------------------------------------------------------- W&B


def log_wandb(cfg: EvalSuiteConfig, prompts: list[str], results: list[dict]) -> dict:
    """Log metrics per checkpoint step and one table of (checkpoint, prompt, image, scores); returns run info."""
    run = Run(RunConfig(root=storage.join(cfg.output, "tracking")))
    ordered = sorted(results, key=lambda r: r["checkpoint"]["step"])
    # Grouped with the run that wrote the first checkpoint; every checkpoint is an input artifact (lineage).
    tracker = Tracker(cfg.tracking, run, to_dict(cfg), source=ordered[0]["checkpoint"]["url"] if ordered else None)
    for r in ordered[1:]:
        tracker.use_artifact(model_input(r["checkpoint"]["url"]))
    score_cols = sorted({k for r in results for row in r["per_image"] for k in row if k not in ITEM_KEYS})
    columns = ["checkpoint", "step", "prompt_idx", "sample_idx", "prompt", "image", *score_cols]
    rows = []
    for r in ordered:
        step = r["checkpoint"]["step"]
        tracker.log({f"eval/{k}": v for k, v in r["metrics"].items()}, step=step, samples=r["checkpoint"]["samples"])
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


_CSS = """.row{display:flex;gap:6px;align-items:center;margin:4px 0}.row span{width:160px;font-size:12px}
h3{font-size:14px;margin:16px 0 4px}"""


def metric_names(results: list[dict]) -> list[str]:
    """Metric keys shown in the table and plots, in a stable order."""
    names: list[str] = []
    for r in results:  # per-class accuracies are shown in the adherence tables instead
        names += [k for k in r["metrics"] if k not in names and not k.startswith(PER_CLASS_PREFIX)]
    return names


def metrics_table(results: list[dict], names: list[str]) -> R.Markup:
    """One row per checkpoint: label, step, samples, the used weights' sha256 prefix, every metric."""
    rows = []
    for r in results:
        c = r["checkpoint"]
        sha = c["weights_sha256"].get(c["weights_used"], "")[:12]
        rows.append([r["label"], c["step"], c["samples"], R.el("code", sha), *[r["metrics"].get(n) for n in names]])
    return R.table(["checkpoint", "step", "samples", "weights sha256", *names], rows)


def metric_plots(results: list[dict], names: list[str]) -> list:
    """Each score against the checkpoint step (only with several checkpoints)."""
    if len(results) < 2:
        return []
    svgs = [R.line_plot([(r["checkpoint"]["step"], r["metrics"].get(n)) for r in results], title=n, x_label="step")
            for n in names if n not in SCORE_KEYS_SKIP]
    return [R.el("h2", "Metrics vs step"), R.el("div", *[s for s in svgs if s], class_="plots")]


def confusion_table(rows: list[str], cols: list[str], counts) -> R.Markup:
    """A confusion matrix: one row per prompted class, one column per predicted class, counts in the cells."""
    get = (lambda r, c: counts[r][c]) if isinstance(counts, list) else (lambda r, c: counts.get(rows[r], {}).get(
        cols[c], 0))
    return R.table(["prompted \\ predicted", *cols],
                   [[rows[r], *[get(r, c) or "" for c in range(len(cols))]] for r in range(len(rows))])


def adherence_blocks(adherence: dict, title: str = "") -> list:
    """Classifier accuracy (per class + confusion matrix, with the judge's held-out real accuracy) and colour
    adherence (per named colour + confusion), for one checkpoint's ``adherence`` details."""
    out: list = []
    c = adherence.get("classifier")
    if c:
        held = c.get("holdout_accuracy")
        out += [R.el("h3", f"{title}classifier accuracy {c['accuracy']:.3f} over {c['n']} images"),
                R.el("p", "The judge's accuracy on held-out real images: "
                          + (f"{held:.3f}" if held is not None else "not recorded") + ". Rows: the label the prompt "
                          "named; columns: the label the classifier saw.", class_="muted"),
                R.table(["label", "accuracy"], [[k, f"{v:.3f}"] for k, v in c["per_class"].items()]),
                confusion_table(c["labels"], c["labels"], c["confusion"])]
    k = adherence.get("colour")
    if k and k.get("n"):
        named = list(k["confusion"])
        seen = sorted({g for row in k["confusion"].values() for g in row})
        out += [R.el("h3", f"{title}colour adherence {k['accuracy']:.3f} over {k['n']} colour-naming prompts' images"),
                R.table(["named colour", "dominant foreground colour matches"],
                        [[name, f"{v:.3f}"] for name, v in k["per_colour"].items()]),
                confusion_table(named, seen, k["confusion"])]
    return out


def control_blocks(cfg: EvalSuiteConfig, results: list[dict]) -> list:
    """Control adherence of every checkpoint beside the floor (scale 0: the base) and the ceiling (real images),
    then condition | generated | no control | real for the first prompts."""
    rows = [(r, r["adherence"]["control"]) for r in results if (r.get("adherence") or {}).get("control")]
    if not rows:
        return []
    c0 = rows[0][1]
    better = "higher" if c0["higher_is_better"] else "lower"
    out = [R.el("h2", f"Control adherence ({c0['condition']}: {c0['metric']}, {better} is better)"),
           R.el("p", f"The annotator ({c0['annotator']['name']}) run on each generated image and compared with the "
                     "condition it was generated from. Floor: the same checkpoint at control scale 0 (its base "
                     "model). Ceiling: the real images against their own conditions.", class_="muted"),
           R.table(["checkpoint", "generated", "floor (no control)", "ceiling (real)", "images"],
                   [[r["label"], f"{c['value']:.4f}", "" if c.get("floor") is None else f"{c['floor']:.4f}",
                     f"{c['ceiling']:.4f}", c["n"]] for r, c in rows])]
    from tessera.evaluation.control import read_control_image

    n_prompts = max(row["prompt_idx"] for row in rows[0][0]["per_image"]) + 1
    for p in range(min(cfg.report_max_prompts, n_prompts)):
        row = [R.el("span", f"{p}")]
        row.append(R.img(R.image_data_uri(read_control_image(cfg.output, "condition", p), THUMBNAIL), title="condition"))
        for r, c in rows:
            row.append(R.img(R.image_data_uri(ImageFolder(r["folder"]).read_image((p, 0)), THUMBNAIL),
                             title=f"{r['label']} generated"))
            if c.get("floor_folder"):
                row.append(R.img(R.image_data_uri(ImageFolder(c["floor_folder"]).read_image((p, 0)), THUMBNAIL),
                                 title=f"{r['label']} no control"))
        row.append(R.img(R.image_data_uri(read_control_image(cfg.output, "real", p), THUMBNAIL), title="real"))
        out.append(R.el("div", *row, class_="row"))
    return out


def adherence_section(results: list[dict]) -> list:
    """Prompt adherence of every checkpoint (empty when the suite measures none)."""
    blocks = [b for r in results for b in adherence_blocks(r.get("adherence") or {}, f"{r['label']}: ")]
    return [R.el("h2", "Prompt adherence"), *blocks] if blocks else []


def sample_rows(cfg: EvalSuiteConfig, prompts: list[str], results: list[dict]) -> list:
    """Per prompt, one row of thumbnails per checkpoint (the first ``report_max_prompts`` prompts)."""
    folders = [(r["label"], ImageFolder(r["folder"]), r["generation"]["images_per_prompt"]) for r in results]
    out = []
    for p, prompt in enumerate(prompts[:cfg.report_max_prompts]):
        out.append(R.el("h3", f"{p}: {prompt}"))
        for label, folder, n in folders:
            thumbs = [R.img(R.image_data_uri(folder.read_image((p, s)), THUMBNAIL), alt=f"{p}_{s}",
                            title=f"{label} {p}_{s}") for s in range(n)]
            out.append(R.el("div", R.el("span", label), *thumbs, class_="row"))
    return out


def render_report(cfg: EvalSuiteConfig, prompts: list[str], results: list[dict]) -> str:
    """The whole HTML report as a string (thumbnails embedded, plots as inline SVG)."""
    names = metric_names(results)
    ref = results[0].get("reference") if results else None
    body = [
        R.el("h1", f"Evaluation: {cfg.name}"),
        R.el("p", f"{len(results)} checkpoint(s), {len(prompts)} prompts, config hash ",
             R.el("code", config_hash(cfg)[:16]), f", {time.strftime('%Y-%m-%d %H:%M:%S')}"),
        R.el("h2", "Metrics"), metrics_table(results, names), *metric_plots(results, names),
        *adherence_section(results), *control_blocks(cfg, results),
        R.el("h2", "Samples by prompt"), *sample_rows(cfg, prompts, results),
        R.el("h2", "Reference statistics"),
        R.el("pre", json.dumps(ref, indent=1, default=str)) if ref else R.el("p", "FID disabled."),
        R.el("h2", "Suite config"), R.el("pre", dump_yaml(cfg)),
    ]
    return R.page(f"{cfg.name} evaluation", body, css=_CSS)
