"""The methods' math, in process with stand-in networks: progressive's target lands a one-step student where the
teacher's two steps land (exactly the data for an exact teacher), for every objective and prediction type; the LCM
consistency function's boundary and skipping interval; the teacher's guidance folded in only inside the guidance
interval, with the empty prompt as the unconditional; an objective that does not fit a method is refused naming the
ones that do."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjectiveConfig, ObjectiveConfig
from tessera.trainer.diffusion.process import Process
from tessera.trainer.diffusion.samplers.lcm import lcm_origin_times
from tessera.trainer.text_encoders import TextEmbedding

from tessera.distill.config import DistillJobConfig, LCMConfig, ProgressiveConfig
from tessera.distill.methods import LCM, ObjectiveMismatch, Progressive
from tessera.distill.methods.base import check_fits
from tessera.distill.methods.lcm import consistency
from tessera.distill.methods.progressive import step_grid, two_step_target
from tessera.distill.teacher import Guidance, Teacher

OBJECTIVES = {"ddpm-eps": ("ddpm", "eps"), "ddpm-v": ("ddpm", "v"), "ddpm-x0": ("ddpm", "x0"),
              "flow-velocity": ("flow", "velocity"), "flow-sample": ("flow", "sample")}


def objective(name: str, prediction: str) -> ObjectiveConfig:
    cls = DDPMObjectiveConfig if name == "ddpm" else FlowObjectiveConfig
    return ObjectiveConfig(name=name, **{name: cls(prediction=prediction)})


class Source:
    """A Reference-like source whose network is ``fn(x, timestep, hidden, mask, pooled)``."""

    def __init__(self, fn) -> None:
        self.fn = fn

    @contextlib.contextmanager
    def model(self):
        yield self.fn


def cond_of(values: list[float]):
    """A text condition per sample whose hidden states hold one value (the stand-in networks read it back)."""
    h = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 4).clone()
    return TextEmbedding(h, torch.ones(len(values), 2, dtype=torch.bool), None)


def exact_teacher(p: Process, data: torch.Tensor, guidance: Guidance | None = None) -> Teacher:
    """A teacher whose data distribution is one point: its output gives exactly ``data`` as x0 at any (x, t)."""
    def net(x, timestep, hidden, mask, pooled):
        t = timestep.double() / (p.cfg.timestep_scale if p.kind == "flow" else 1.0)
        return p.output_for(data.expand_as(x).to(x.dtype), x, t).float()
    return Teacher(Source(net), p, guidance or Guidance(1.0, None), lambda c: c, torch.float32)


@pytest.mark.parametrize("key", OBJECTIVES)
def test_progressive_target_is_the_data_for_an_exact_teacher(key):
    p = Process(objective(*OBJECTIVES[key]))
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    grid = step_grid(p.objective, 8, (1, 3, 4, 4))
    i = torch.arange(4)
    t, tm, s = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    eps = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    z = p.noise(data.expand(4, -1, -1, -1), eps, t)
    target = two_step_target(exact_teacher(p, data), z, t, tm, s, cond_of([0.0] * 4))
    # the teacher's output is float32: an eps model's x0 = (z - sigma eps) / alpha magnifies its rounding by 1 / alpha
    # (156 at T - 1), which is why the student of an eps teacher predicts v
    tol = 1e-4 if key == "ddpm-eps" else 1e-6
    torch.testing.assert_close(target, data.expand(4, -1, -1, -1), rtol=tol, atol=tol)


def test_progressive_target_lands_a_one_step_student_on_the_teacher_s_two_steps():
    p = Process(objective("flow", "velocity"))
    data = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def net(x, timestep, hidden, mask, pooled):  # any smooth field: the identity of the target must still hold
        return torch.tanh(x * 0.8 + timestep.view(-1, 1, 1, 1) / 1000.0).float()
    teacher = Teacher(Source(net), p, Guidance(1.0, None), lambda c: c, torch.float32)
    t, tm, s = torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.0])
    z = p.noise(data, torch.randn_like(data), t)
    x_tilde = two_step_target(teacher, z, t, tm, s, cond_of([0.0, 0.0]))
    one_step = p.ddim(x_tilde, (z - p.noise(x_tilde, torch.zeros_like(z), t)) / t.view(-1, 1, 1, 1), s)
    two_steps = teacher.ddim(teacher.ddim(z, t, tm, cond_of([0.0, 0.0])), tm, s, cond_of([0.0, 0.0]))
    torch.testing.assert_close(one_step.float(), two_steps.float(), rtol=1e-5, atol=1e-5)


def test_progressive_grids_halve_into_each_other_and_an_eps_student_is_read_as_v():
    for obj in (objective("ddpm", "eps"), objective("flow", "sample")):
        g16, g8 = step_grid(obj, 16, (1, 3, 8, 8)), step_grid(obj, 8, (1, 3, 8, 8))
        assert torch.equal(g16[::2], g8) and len(g8) == 9
    job = DistillJobConfig(checkpoint="x", method={"name": "progressive"})
    teacher_job = SimpleNamespace(objective=objective("ddpm", "eps"))
    assert Progressive(ProgressiveConfig(), job, teacher_job).student_objective().ddpm.prediction == "v"
    teacher_job = SimpleNamespace(objective=objective("ddpm", "x0"))
    assert Progressive(ProgressiveConfig(), job, teacher_job).student_objective().ddpm.prediction == "x0"
    with pytest.raises(ValueError, match="power of 2"):
        ProgressiveConfig(start_steps=12, final_steps=2)


@pytest.mark.parametrize("key", ["ddpm-eps", "flow-sample"])
def test_lcm_consistency_function_is_the_identity_at_the_clean_end_and_the_grid_skips_k(key):
    p = Process(objective(*OBJECTIVES[key]))
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    clean = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(consistency(p, out, z, clean), z)  # f(x, 0) = x: the boundary condition
    lcm = LCM(LCMConfig(origin_steps=20), DistillJobConfig(checkpoint="x"), SimpleNamespace(objective=p.objective))
    idx = torch.tensor([0, 1, 19])
    t, s = lcm.times(p, (3, 3, 16, 16), idx)
    origin = lcm_origin_times(p.cfg, 20, (3, 3, 16, 16))
    torch.testing.assert_close(t, origin[idx])
    if p.kind == "ddpm":  # k = 1000 / 20 = 50, clamped at timestep 0 (diffusers' DDIMSolver)
        assert t.tolist() == [49.0, 99.0, 999.0] and s.tolist() == [0.0, 49.0, 949.0]
    else:
        assert s[0] == 0 and torch.equal(s[1:], origin[idx[1:] - 1])


def test_teacher_guides_inside_the_interval_only_with_the_empty_prompt():
    p = Process(objective("flow", "velocity"))

    def net(x, timestep, hidden, mask, pooled):  # reads the condition back: cond -> its value, empty -> 0
        return hidden[:, :1, :1].view(-1, 1, 1, 1).expand_as(x).float()
    empty = cond_of([0.0, 0.0])
    teacher = Teacher(Source(net), p, Guidance(3.0, [0.5, 1.0]), lambda c: empty, torch.float32)
    x = torch.zeros(2, 3, 2, 2)
    out = teacher.output(x, torch.tensor([0.9, 0.2], dtype=torch.float64), cond_of([1.0, 1.0]))
    # inside [0.5, 1]: u + 3 (c - u) = 3; outside: the conditional output alone, 1
    assert out[0].unique().tolist() == [3.0] and out[1].unique().tolist() == [1.0]
    plain = Teacher(Source(net), p, Guidance(1.0, None), lambda c: empty, torch.float32)
    assert plain.output(x, torch.tensor([0.9, 0.2], dtype=torch.float64), cond_of([1.0, 1.0])).unique().tolist() == [1.0]


def test_an_objective_that_does_not_fit_names_the_methods_that_do():
    with pytest.raises(ObjectiveMismatch, match=r"reflow.*'ddpm'.*fit it: progressive, lcm"):
        check_fits("reflow", objective("ddpm", "eps"), "runs/x")
    with pytest.raises(ObjectiveMismatch, match="none of progressive, lcm, reflow"):
        check_fits("lcm", ObjectiveConfig(name="edm"), "runs/x")
    check_fits("reflow", objective("flow", "sample"), "runs/x")


def test_from_the_second_progressive_round_the_teacher_is_read_as_the_v_student_and_unguided():
    eps_p, v_p = Process(objective("ddpm", "eps")), Process(objective("ddpm", "v"))
    data = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    # the previous round's student: a v network, exact for a one-point data distribution, guidance folded in
    student_as_net = exact_teacher(v_p, data).source
    teacher = Teacher(student_as_net, eps_p, Guidance(3.0, None), lambda c: cond_of([5.0] * 2), torch.float32)
    grid = step_grid(eps_p.objective, 4, (1, 3, 4, 4))
    t, tm, s = grid[[0, 2]], grid[[1, 3]], grid[[2, 4]]
    z = eps_p.noise(data.expand(2, -1, -1, -1), torch.randn(2, 3, 4, 4, dtype=torch.float64), t)
    ctx = SimpleNamespace(teacher=teacher, student_process=v_p)
    Progressive.student_as_teacher(ctx)
    assert teacher.process is v_p and teacher.guidance.cfg_scale == 1.0
    target = two_step_target(teacher, z, t, tm, s, cond_of([0.0, 0.0]))
    torch.testing.assert_close(target, data.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_trajectory_states_follow_the_teacher_s_euler_path_and_a_student_on_it_has_zero_loss():
    """reflow.targets=trajectory: the states stored at the student's levels are the teacher's Euler path (a level
    on one of its steps is that step's state, one between steps the straight line Euler drew), and each of the
    student's segments targets the velocity from one stored state to the next (zero loss for the exact student)."""
    from tessera.distill.config import ReflowConfig
    from tessera.distill.methods import Reflow
    from tessera.distill.pairs import path_states
    from tessera.trainer.diffusion import rng
    from tessera.trainer.diffusion.sampling import SamplerConfig, build_sampler, sample
    from tessera.trainer.engine import sample_generators

    obj = objective("flow", "velocity")
    p = Process(obj)

    def net(x, timestep, cond):  # a curved field: the path is not a straight line
        return torch.tanh(x * 0.8 + timestep.view(-1, 1, 1, 1) / 700.0).float() + x.pow(2) * 0.1

    shape, gen = (3, 2, 4, 4), torch.Generator().manual_seed(0)
    sampler = build_sampler(SamplerConfig(name="euler_uniform", steps=8), obj)
    xs = [torch.randn(shape, generator=torch.Generator().manual_seed(0))]
    x0 = sample(net, sampler, shape, None, steps=8, generator=gen, on_step=lambda i, x: xs.append(x.clone()))
    assert len(xs) == 9 and torch.equal(xs[-1], x0)
    method = Reflow(ReflowConfig(sample_steps=4, targets="trajectory"), SimpleNamespace(),
                    SimpleNamespace(objective=obj))
    states = path_states(sampler.sigmas, xs, method.interior(shape))  # levels 0.75, 0.5, 0.25: steps 2, 4, 6
    assert states.shape == (3, 3, 2, 4, 4)
    for j in range(3):
        torch.testing.assert_close(states[:, j], xs[2 * (j + 1)], rtol=0, atol=1e-6)
    mid = path_states(sampler.sigmas, xs, torch.tensor([0.8125]))[:, 0]  # half-way through step 1 (0.875 -> 0.75)
    torch.testing.assert_close(mid, 0.5 * (xs[1] + xs[2]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="outside the teacher's path"):
        path_states(sampler.sigmas, xs, torch.tensor([1.5]))

    path = torch.cat([xs[0][:, None], states, x0[:, None]], 1)
    grid = method.grid(shape)
    picked = []

    def exact_student(x_t, timestep, cond):  # the velocity from the state it is given to the next stored state
        t = timestep.double() / p.cfg.timestep_scale
        j = torch.stack([(grid - tt).abs().argmin() for tt in t])
        picked.append(j)
        rows = torch.arange(len(j))
        assert torch.equal(x_t, path[rows, j])  # it starts from the teacher's state at its level
        return ((path[rows, j] - path[rows, j + 1]) / (grid[j] - grid[j + 1]).view(-1, 1, 1, 1)).float()

    ctx = SimpleNamespace(student=exact_student, process=p)
    gens = sample_generators(0, 1, ["a", "b", "c"])
    loss = method.trajectory_loss(ctx, xs[0], x0, states, None, gens)
    assert loss.shape == (3,) and float(loss.max()) < 1e-10
    expect = (rng.rand(3, sample_generators(0, 1, ["a", "b", "c"]), "cpu") * 4).long().clamp_(max=3)
    assert torch.equal(picked[0], expect)  # each sample's segment is its own generator's draw
    wrong = SimpleNamespace(student=lambda x, t, c: torch.zeros_like(x), process=p)
    assert float(method.trajectory_loss(wrong, xs[0], x0, states, None, sample_generators(0, 1, ["a", "b", "c"])
                                        ).min()) > 1e-3
