"""Memory of the lowrank λ step's backward (issue 24's ≤ 0.7x peak goal; benchmarks/RESULTS.md section 11):
the peak of tensor bytes alive during one backward, from torch.profiler's allocator events."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lobes.adaltm.lowrank_linear import LowRankConv1d, LowRankLinear, LowRankOps


def _backward_peak_bytes(out, grad):
    """Highest sum of bytes allocated and not yet freed during ``out.backward(grad)``, above its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out.backward(grad)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.name == "[memory]":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _factors(out, inner, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g), torch.randn(inner, r, generator=g)


class _Conv1dInputGrad(torch.autograd.Function):
    """conv1d whose dX is ``torch.nn.grad.conv1d_input`` (the old lowrank conv backward), for the reference peak."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.shape, ctx.w = x.shape, w
        return F.conv1d(x, w, stride=2)

    @staticmethod
    def backward(ctx, dy):
        return torch.nn.grad.conv1d_input(ctx.shape, ctx.w, dy, 2, 0, 1), None


def test_conv_backward_does_not_copy_a_dummy_input():
    """The CNN's second conv at 1/8 width. torch.nn.grad.conv1d_input hands convolution_backward a stride-0 dummy
    input of x's shape, which it makes contiguous: its backward peaks one x-sized block above the transposed
    convolution used now (4.0 vs 3.0 x the bytes of x on one thread, 5.0 vs 4.0 on two: measured here against it
    in the same process, so the thread count does not matter). Per-tap GEMMs kept 1.6 x but were 23% slower, and
    the step's peak is not in the CNN's backward (RESULTS section 11)."""
    torch.manual_seed(0)
    ranks = (4, 4)
    base = torch.randn(64, 64, 3)
    u, v = _factors(64, 64 * 3, sum(ranks))
    x = torch.randn(2, 64, 8001, requires_grad=True)
    lam = torch.tensor([0.5, 0.5], requires_grad=True)
    y = LowRankConv1d.apply(x, lam, base, None, u, v, ranks, (2,), (0,), (1,))
    dy = torch.randn_like(y)
    peak = _backward_peak_bytes(y, dy)
    w = (base + (u * 0.5 @ v.T).view(base.shape)).requires_grad_(False)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = _backward_peak_bytes(_Conv1dInputGrad.apply(x_ref, w), dy)
    x_bytes = x.numel() * 4
    assert peak <= reference - 0.9 * x_bytes, (peak / x_bytes, reference / x_bytes)
    assert (x.grad - x_ref.grad).abs().max() <= 1e-4


def test_linear_backward_allocates_dx_once():
    """dX = δ W_base + (δ U λ) Vᵀ accumulated in place: one [tokens, in] tensor (1.03 x the bytes of x; the peak was 2.03 x)."""
    torch.manual_seed(0)
    ranks = (4, 4)
    base = torch.randn(256, 512)
    u, v = _factors(256, 512, sum(ranks))
    x = torch.randn(4000, 512, requires_grad=True)
    lam = torch.tensor([0.5, 0.5], requires_grad=True)
    y = LowRankLinear.apply(x, lam, base, None, u, v, ranks)
    peak = _backward_peak_bytes(y, torch.randn_like(y))
    assert peak <= 1.2 * x.numel() * 4, peak / (x.numel() * 4)


@pytest.mark.parametrize("bf16", [False, True])
def test_group_norm_gelu_pair_saves_its_input_only(bf16):
    """The GroupNorm CNN's first layer, gelu(group_norm(x)), under LowRankOps saves x once (GroupNorm's own
    save; GELU keeps no h), where plain autograd saves x and h: 2 x-sized tensors -> 1. Same output and
    gradients as plain autograd, bit for bit (h is recomputed by the same kernel, under the same autocast)."""
    torch.manual_seed(0)
    x0, conv = torch.randn(2, 16, 502), torch.randn(16, 16, 3) / 7
    w0, b0 = 1 + 0.1 * torch.randn(16), 0.1 * torch.randn(16)
    results = {}
    for mode in ("plain", "lowrank"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        saved = []
        ops = LowRankOps({}) if mode == "lowrank" else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t, lambda t: t), ops, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.gelu(F.group_norm(F.conv1d(x, conv), 16, w, b, 1e-5))
        big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == y.numel()}
        dy = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
        results[mode] = (y.detach(), *torch.autograd.grad(y, (x, w, b), dy), len(big))
    assert results["plain"][-1] == 2 and results["lowrank"][-1] == 1
    for ref, got in zip(results["plain"][:-1], results["lowrank"][:-1]):
        assert torch.equal(ref, got)
