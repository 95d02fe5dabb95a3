"""FlowUniPC against diffusers' UniPCMultistepScheduler.step: same updates, step by step."""

from __future__ import annotations

import pytest
import torch

from xwam_core.schedule.inference import make_flow_unipc
from xwam_core.schedule.unipc import FlowUniPC

CASES = [(50, 5.0, 2), (10, 5.0, 2), (1, 5.0, 2), (2, 5.0, 2), (30, 3.0, 3), (16, 1.0, 1), (7, 5.0, 3)]


def run_both(num_steps, shift, order, float64_reference):
    reference = make_flow_unipc(num_steps, shift, order)
    reference.set_begin_index(0)
    fast = FlowUniPC(reference.sigmas, order)
    if float64_reference:  # diffusers' scalar arithmetic follows the sigmas' dtype
        reference.sigmas = reference.sigmas.double()
    g = torch.Generator().manual_seed(num_steps)
    x_ref = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    x_fast = x_ref.clone()
    fast.start(x_fast)
    worst = 0.0
    for i in range(num_steps):
        velocity = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # history terms all matter
        x_ref = reference.step(velocity, reference.timesteps[i], x_ref, return_dict=False)[0]
        fast.step(i, velocity, x_fast, out=x_fast)
        worst = max(worst, ((x_fast - x_ref).abs().max() / (1 + x_ref.abs().max())).item())
    return worst


@pytest.mark.parametrize(("num_steps", "shift", "order"), CASES)
def test_same_formulas_as_diffusers_to_float64_precision(num_steps, shift, order):
    assert run_both(num_steps, shift, order, float64_reference=True) < 1e-12


@pytest.mark.parametrize(("num_steps", "shift", "order"), CASES)
def test_matches_diffusers_float32_schedule(num_steps, shift, order):
    # diffusers computes its coefficients in float32; ours in float64: they differ by float32 rounding.
    assert run_both(num_steps, shift, order, float64_reference=False) < 1e-5


def test_steps_in_place_into_a_strided_view_without_allocating_state():
    sigmas = make_flow_unipc(10).sigmas
    buffer = torch.randn(2, 4, 3)
    view = buffer[:, 1:]  # not contiguous, like frames 1.. of a video latent
    expected = view.clone()
    fast, reference = FlowUniPC(sigmas), FlowUniPC(sigmas)
    fast.start(view)
    reference.start(expected)
    state = [id(t) for t in (fast._buffers["xc"], *fast._buffers["m"])]
    for i in range(10):
        velocity = torch.randn(2, 3, 3)
        fast.step(i, velocity, view, out=view)
        expected = reference.step(i, velocity, expected)
    assert torch.equal(view, expected)
    assert state == [id(t) for t in (fast._buffers["xc"], *fast._buffers["m"])]


def test_oracle_velocity_walks_the_straight_path():
    sigmas = make_flow_unipc(10).sigmas
    x0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    solver = FlowUniPC(sigmas)
    x = eps.clone()
    solver.start(x)
    for i in range(10):
        solver.step(i, eps - x0, x, out=x)
        s = float(sigmas[i + 1])
        torch.testing.assert_close(x, (1 - s) * x0 + s * eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)
