"""What the loop logs between two log lines: loss (mean over ranks), per-timestep-quartile loss, throughput,
data wait, TFLOP/s and MFU, memory. No collective happens here: the global loss sum arrives with the step's
one all-reduce (``loop.train_step``). Between log lines everything stays where the step computed it (on the GPU):
``add`` never reads a tensor, so a step that does not log never waits for the device; ``flush`` reads the window
once."""

from __future__ import annotations

import time

import torch


def memory_gb(device: torch.device) -> float:
    """CUDA max allocated, or this process's RSS, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def grad_norm(engine) -> float:
    """Global gradient norm of the last optimizer step, before clipping (inf when the step overflowed)."""
    gn = engine.get_global_grad_norm()
    return float(gn) if gn is not None else float("nan")


class Meter:
    """Accumulates per-step values between log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new logging window."""
        self.losses, self.ts = [], []
        self.global_loss: torch.Tensor | float = 0.0  # (sum, count) over every rank, summed on the device
        self.data_wait = 0.0
        self.steps = 0
        self.samples = 0
        self.flops = 0.0
        self.dropped: torch.Tensor | int = 0
        self.counts: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.loader_stats: dict = {}

    def add(self, loss_per: torch.Tensor, t: torch.Tensor, global_loss: torch.Tensor, samples: int,
            flops: float, t_data: float, on_the_fly: dict, n_dropped: torch.Tensor | int,
            loader_stats: dict | None) -> None:
        """Record one optimizer step: this rank's per-sample losses and timesteps, the (sum, count) of the loss
        over every rank (a (2,) tensor), the step's samples and model FLOPs over every rank, data wait and
        counters. Tensors are kept on their device, unread."""
        self.losses.append(loss_per.detach().float())
        self.ts.append(t.detach().float())
        self.global_loss = self.global_loss + global_loss.detach()
        self.data_wait += t_data
        self.steps += 1
        self.samples += samples
        self.flops += flops
        self.dropped = self.dropped + n_dropped
        for k, v in on_the_fly.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if isinstance(loader_stats, dict):
            self.loader_stats = loader_stats

    def flush(self, peak_per_rank: float, world: int) -> dict:
        """Metrics of the window: loss, loss per timestep quartile (this rank), throughput, data wait, MFU."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        loss, t = torch.cat(self.losses).cpu(), torch.cat(self.ts).cpu()  # the window's one read of the device
        total, count = self.global_loss.tolist() if torch.is_tensor(self.global_loss) else (0.0, 0.0)
        m = {"loss": total / max(count, 1.0), "loss_rank0": float(loss.mean())}
        for q in range(4):
            sel = (t >= q / 4) & (t < (q + 1) / 4 if q < 3 else t <= 1.0)
            if sel.any():
                m[f"loss_q{q}"] = float(loss[sel].mean())
        tflops = self.flops / dt / 1e12
        m.update(samples_per_s=self.samples / dt, flops_per_sample=self.flops / max(self.samples, 1), data_wait_s=self.data_wait / self.steps,
                 data_wait_frac=self.data_wait / dt, tflops_per_s=tflops,
                 mfu=(tflops * 1e12 / (peak_per_rank * world)) if peak_per_rank > 0 else 0.0,
                 cfg_dropped=int(self.dropped))
        m.update({f"onthefly/{k}": int(v) if torch.is_tensor(v) else v for k, v in self.counts.items()})
        for k, v in self.loader_stats.items():
            if isinstance(v, (int, float)):
                m[f"data/{k}"] = v
            elif isinstance(v, dict):
                m.update({f"data/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
        self.reset()
        return m
