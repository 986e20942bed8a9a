"""Time forward + backward + AdamW step: Tessera's DiT vs diffusers' PixArtTransformer2DModel.

Both models get the same depth, width, heads, patch, token counts, batch, parameter count (checked)
and optimizer (torch AdamW, default implementation for the device). The machine's speed drifts, so
through ``bench/harness.py`` the two models run alternately (diffusers, ours, diffusers, ...): each
run is the mean ms/step over ``--steps`` steps, and the medians of ``--repeats`` runs are compared.

    .venv/bin/python bench/dit_step.py --steps 4 --repeats 3 --threads 1 --dtype both
    .venv/bin/python bench/dit_step.py --compile --dtype fp32      # ours with regional torch.compile (inductor)

``--compile`` compiles our blocks as ``train.compile: on`` does (``trainer/compile.py``), against diffusers'
PixArt in eager mode, the way diffusers' training scripts run it (issue #30's goal: <= 0.7x its time).

``--floor`` also profiles ``--steps`` steps of each model (``torch.profiler``, outside the timed runs) and sums the
self time of the matrix-multiply and attention kernels (``KERNELS``): the time no fusion of the glue around them
can remove. Ours' kernel time over diffusers' median step is the best ratio compiling can reach with these kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402


def build_ours(a: argparse.Namespace) -> torch.nn.Module:
    """Our DiT with the benchmark's shape."""
    from tessera.trainer.models.dit import DiT, DiTConfig

    cfg = DiTConfig(in_channels=a.channels, out_channels=a.channels, patch_size=a.patch, hidden_size=a.width,
                    depth=a.depth, num_heads=a.width // a.head_dim, text_dim=a.text_dim,
                    base_size=a.size // a.patch)
    return DiT(cfg)


def build_diffusers(a: argparse.Namespace) -> torch.nn.Module:
    """diffusers PixArt with the same shape (no micro-conditions, caption projection text_dim -> width)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=a.width // a.head_dim, attention_head_dim=a.head_dim, in_channels=a.channels,
        out_channels=a.channels, num_layers=a.depth, cross_attention_dim=a.width, sample_size=a.size,
        patch_size=a.patch, caption_channels=a.text_dim, use_additional_conditions=False, interpolation_scale=1,
    )


def make_step(model, kind: str, a: argparse.Namespace, dtype: str):
    """A closure running one training step on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.channels, a.size, a.size, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g).float()
    text = torch.randn(a.batch, a.text_len, a.text_dim, generator=g)
    mask = torch.ones(a.batch, a.text_len, dtype=torch.long)
    mask[:, a.text_len * 3 // 4:] = 0  # a realistic padded tail
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            if kind == "ours":
                out = model(x, t, text, mask)
            else:
                out = model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()

    return step


def run_steps(step, n: int) -> float:
    """Mean wall ms per step over ``n`` consecutive steps."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) * 1e3 / n


# The kernels a step's matrix products and attention run in (fp32 on CPU: MKL's GEMMs and the flash kernel).
KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_efficient_attention_forward",
           "aten::_efficient_attention_backward", "aten::_flash_attention_forward", "aten::_flash_attention_backward")


def kernel_ms(step, n: int) -> dict:
    """Per step: the self time (ms) of the ``KERNELS`` and of everything, over ``n`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    kern = sum(e.self_cpu_time_total for e in events if e.key in KERNELS) / 1e3 / n
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / n
    return {"kernels_ms": round(kern, 1), "profiled_ms": round(total, 1), "kernel_share": round(kern / total, 3)}


def compare(report: Report, a: argparse.Namespace, dtype: str) -> dict:
    """One dtype: build both models, warm up, then alternate timed runs through the harness."""
    torch.manual_seed(0)
    models = {"ours": build_ours(a), "diffusers": build_diffusers(a)}
    if a.compile:
        from tessera.trainer.compile import compile_blocks

        compile_blocks(models["ours"], "on", torch.device("cpu"), zero_stage=1)
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if sizes["ours"] != sizes["diffusers"]:  # same architecture, so the same parameters
        raise SystemExit(f"models differ in size: {sizes}")
    steps = {k: make_step(m, k, a, dtype) for k, m in models.items()}

    def warmup() -> None:
        for _ in range(a.warmup):
            for fn in steps.values():
                fn()

    what = " compiled" if a.compile else ""
    cmp = Comparison(name=f"DiT{what} train step {dtype} ({sizes['ours'] / 1e6:.2f}M params)", metric="ms/step",
                     higher_is_better=False, peer="diffusers PixArt")
    peer, ours = (lambda: run_steps(steps["diffusers"], a.steps)), (lambda: run_steps(steps["ours"], a.steps))
    result = report.compare(cmp, peer, ours, repeats=a.repeats, warmup=warmup)
    if a.floor:
        prof = {k: kernel_ms(steps[k], a.steps) for k in ("diffusers", "ours")}
        floor = prof["ours"]["kernels_ms"] / result["peer_runs"]["median"]
        report.note(f"kernel floor {dtype}{what}", {**prof, "ours_kernels_over_peer_step": round(floor, 3)})
        result["floor"] = floor
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the comparison, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per model (alternating)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="latent side")
    p.add_argument("--channels", type=int, default=8, help="latent in/out channels")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="ours with regional torch.compile of its blocks")
    p.add_argument("--floor", action="store_true", help="also profile each model's GEMM + attention kernel time")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtypes = ["fp32", "bf16"] if a.dtype == "both" else [a.dtype]
    report = Report("dit_step", vars(a), ["torch", "diffusers"])
    report.note("shape", f"depth={a.depth} width={a.width} heads={a.width // a.head_dim} patch={a.patch} "
                         f"batch={a.batch} latent={a.channels}x{a.size}x{a.size} text={a.text_len}x{a.text_dim} "
                         f"threads={torch.get_num_threads()}")
    for dt in dtypes:
        compare(report, a, dt)
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
