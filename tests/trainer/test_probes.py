"""Caption information gain: zero for a model that ignores its text, positive once conditioning is learned, about
zero for a model trained with every caption dropped; computed without touching the training; logged by the loop."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.trainer.diffusion.cfg_dropout import CFGDropoutConfig, drop_condition
from tessera.trainer.diffusion.objectives import FlowObjective, FlowObjectiveConfig
from tessera.trainer.engine import sample_generators
from tessera.trainer.models.dit import DiT, DiTConfig
from tessera.trainer.probes import caption_gain, empty_condition, shift_condition
from tessera.trainer.text_encoders import TextEmbedding

COLOURS = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])  # red, green, blue, yellow in [-1, 1]
L, DT = 4, 32  # text tokens, text width


def class_text(n_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random 'caption embeddings' per class: (K, L, DT) tokens and (K, DT) pooled vectors."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n_classes, L, DT, generator=g), torch.randn(n_classes, DT, generator=g)


def batch(y: torch.Tensor, tokens, pooled, g: torch.Generator) -> tuple[torch.Tensor, TextEmbedding]:
    """Images whose colour is their class (a flat colour plus noise) and their class captions."""
    x0 = COLOURS[y][:, :, None, None] * 0.8 + 0.2 * torch.randn(len(y), 3, 16, 16, generator=g)  # (B, 3, 16, 16)
    return x0, TextEmbedding(tokens[y], torch.ones(len(y), L, dtype=torch.bool), pooled[y])


def empty_text() -> TextEmbedding:
    """A content-free 'empty prompt': one zero token."""
    return TextEmbedding(torch.zeros(1, 2, DT), torch.tensor([[True, False]]), torch.zeros(1, DT))


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2, text_dim=DT, pooled_dim=DT,
                         base_size=4))


def model_fn_of(model):
    return lambda x, t, c: model(x, t, c.hidden, c.mask, c.pooled)


def train(p_drop: float, steps: int = 150) -> DiT:
    """A tiny DiT trained in-process on the colour task with CFG dropout ``p_drop`` (1.0: every caption dropped)."""
    model, obj = tiny_dit(), FlowObjective(FlowObjectiveConfig(prediction="sample"))
    tokens, pooled = class_text()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        y = torch.randint(0, 4, (16,), generator=g)
        x0, cond = batch(y, tokens, pooled, g)
        gens = sample_generators(0, step, [f"s{i}" for i in range(16)])
        cond, _ = drop_condition(CFGDropoutConfig(p=p_drop), cond, empty_text(), gens)
        loss = obj.loss(model_fn_of(model), x0, cond, gens)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def probe(model, seeds: int = 4) -> float:
    """Mean caption gain over ``seeds`` fresh batches of 16."""
    obj = FlowObjective(FlowObjectiveConfig(prediction="sample"))
    tokens, pooled = class_text()
    g = torch.Generator().manual_seed(123)
    gains = []
    for s in range(seeds):
        y = torch.arange(16) % 4
        x0, cond = batch(y, tokens, pooled, g)
        keys = [f"p{s}-{i}" for i in range(16)]
        out = caption_gain(obj, model_fn_of(model), x0, cond, lambda: sample_generators(7, s, keys))
        gains.append(float((out["shuffled"] - out["own"]).mean()))
    return sum(gains) / len(gains)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: more threads only contend on a shared machine
    try:
        return {"learned": train(0.1), "all_dropped": train(1.0)}
    finally:
        torch.set_num_threads(threads)


def test_caption_gain_is_positive_once_learned_and_about_zero_with_every_caption_dropped(trained):
    learned, dropped = probe(trained["learned"]), probe(trained["all_dropped"])
    assert learned > 0.05, learned  # the shifted caption names another colour: a clearly worse prediction
    assert abs(dropped) < 0.1 * learned, (learned, dropped)


def test_caption_gain_is_exactly_zero_for_a_model_that_ignores_its_text():
    obj = FlowObjective(FlowObjectiveConfig())
    tokens, pooled = class_text()
    x0, cond = batch(torch.arange(8) % 4, tokens, pooled, torch.Generator().manual_seed(0))
    blind = lambda x, t, c: x * 0.5  # noqa: E731
    out = caption_gain(obj, blind, x0, cond, lambda: sample_generators(0, 0, [str(i) for i in range(8)]),
                       empty=empty_text())
    assert torch.equal(out["own"], out["shuffled"]) and torch.equal(out["own"], out["empty"])


def test_the_probe_changes_neither_weights_nor_global_rng(trained):
    model = trained["learned"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe(model, seeds=1)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # no backward happened (no_grad)


def test_shifted_and_empty_conditions():
    tokens, pooled = class_text()
    _, cond = batch(torch.arange(4), tokens, pooled, torch.Generator().manual_seed(0))
    s = shift_condition(cond)
    for i in range(4):  # every sample gets another sample's caption, all three tensors together
        assert torch.equal(s.hidden[i], cond.hidden[i - 1]) and torch.equal(s.pooled[i], cond.pooled[i - 1])
        assert not torch.equal(s.hidden[i], cond.hidden[i])
    e = empty_condition(cond, empty_text())
    assert e.hidden.shape == cond.hidden.shape and e.mask.tolist() == [[True, False, False, False]] * 4
    assert e.pooled.shape == cond.pooled.shape and not e.pooled.any()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_loop_logs_the_probe_on_two_ranks(tmp_path):
    from tests.trainer import helpers as H

    enc = H.tiny_text_encoder(tmp_path / "enc")
    H.tiny_dataset(tmp_path / "ds")
    ovs = H.overrides(tmp_path, "probe", str(tmp_path / "ds"), enc,
                      **{"train.total_samples": 64, "train.log_every_samples": 16, "cfg_dropout.p": 0.1,
                         "probe.every_logs": 2})
    H.check(H.run_train(ovs, nproc=2))
    rows = H.metrics(tmp_path / "runs" / "probe")
    assert len(rows) == 4 and all("loss" in r for r in rows)  # merged into the log rows: one row per step
    assert ["probe/caption_gain" in r for r in rows] == [False, True, False, True]  # every 2nd log line
    for r in rows[1::2]:
        assert all(math.isfinite(r[k]) for k in ("probe/caption_gain", "probe/uncond_gain", "probe/loss_own"))
        assert r["probe/caption_gain"] == pytest.approx(r["probe/loss_shuffled"] - r["probe/loss_own"], abs=1e-6)
        assert 0 < r["probe/loss_own"] < 10


def _probe_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of the 2-rank probe check: the same tiny DiT, this rank's own batch; writes (local, logged)."""
    import json
    from types import SimpleNamespace
    from unittest import mock

    import torch.distributed as dist

    from tessera.trainer import distributed as D
    from tessera.trainer import probes

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, obj = tiny_dit(), FlowObjective(FlowObjectiveConfig(prediction="sample"))
    with torch.no_grad():  # the same non-zero weights on both ranks (a fresh DiT's zero output ignores the text)
        for p in model.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    tokens, pooled = class_text()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own images and captions
    y = torch.randint(0, 4, (6,), generator=g)
    x0, cond = batch(y, tokens, pooled, g)
    mb = [{"latent": x0, "text_hidden": cond.hidden, "text_mask": cond.mask, "text_pooled": cond.pooled,
           "key": [f"r{rank}-{i}" for i in range(6)]}]
    cfg = SimpleNamespace(cfg_dropout=SimpleNamespace(p=0.0), train=SimpleNamespace(seed=0))
    fn = lambda x, t, h, m, p: model(x, t, h, m, p)  # noqa: E731  (what the DeepSpeed engine's forward is)

    class Engine:
        module = model

        def __call__(self, *a):
            return fn(*a)

    with mock.patch.object(D, "all_reduce_sum", lambda t: t.to(torch.float64).tolist()):  # this rank alone
        local = probes.run_probe(Engine(), obj, None, mb, cfg, 3, torch.float32, torch.device("cpu"))
    logged = probes.run_probe(Engine(), obj, None, mb, cfg, 3, torch.float32, torch.device("cpu"))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"local": local, "logged": logged}, f)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_the_logged_probe_is_the_mean_over_ranks_that_saw_different_data(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_probe_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["logged"] == r[1]["logged"]  # every rank logs the same value
    for k in ("probe/loss_own", "probe/loss_shuffled", "probe/caption_gain"):
        a, b = r[0]["local"][k], r[1]["local"][k]
        assert abs(a - b) > 1e-4, k  # the ranks' own values differ: the mean is not either of them
        assert r[0]["logged"][k] == pytest.approx((a + b) / 2, rel=1e-9, abs=1e-12), k
