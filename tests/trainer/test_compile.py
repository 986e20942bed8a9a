"""Regional torch.compile (trainer/compile.py) on CPU inductor: every repeated block compiled in place, the same
outputs and gradients as eager, and the cases that stay eager (auto on CPU, ZeRO-3, a model without blocks)."""

from __future__ import annotations

import copy

import pytest
import torch

from tessera.trainer.compile import compile_blocks
from tessera.trainer.models import DiTConfig, build_model

CPU = torch.device("cpu")


def _dit():
    torch.manual_seed(0)
    return build_model("dit", DiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=3, num_heads=2,
                                        text_dim=16, base_size=4))


def _run(model, backward: bool = True):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.set_grad_enabled(backward):
        out = model(x, torch.tensor([0.3, 0.7]), text, mask)
    if backward:
        out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("backend,backward", [("inductor", False), ("aot_eager", True)])
def test_blocks_compile_and_match_eager(backend, backward):
    """Inductor's CPU code generation on the forward (its backward compile takes minutes on 2 cores); the traced
    forward and backward graphs (aot_eager: dynamo + AOTAutograd, no code generation) for the gradients."""
    eager = _dit()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, "on", CPU, zero_stage=2, backend=backend) == 3
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)  # each block is a compiled module
    torch._dynamo.reset()
    out_e, grads_e = _run(eager, backward)
    out_c, grads_c = _run(compiled, backward)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and (len(grads_e) > 0) == backward
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def test_what_stays_eager():
    model = _dit()
    assert compile_blocks(model, "auto", CPU, zero_stage=2) == 0  # auto compiles on CUDA only
    assert compile_blocks(model, "off", torch.device("cuda"), zero_stage=2) == 0
    assert compile_blocks(model, "on", CPU, zero_stage=3) == 0  # ZeRO-3's hooks would break every graph
    assert compile_blocks(torch.nn.Linear(2, 2), "on", CPU, zero_stage=1) == 0  # no repeated blocks
    assert all(b._compiled_call_impl is None for b in model.blocks)
