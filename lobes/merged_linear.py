"""Fused eq. (4) for λ-training: the linear combination W = W_base + Σ_k λ_k ΔW_k as one autograd node,
and merged weights that are rebuilt in backward instead of being kept alive by the ops that use them.

Used by :class:`lobes.merged_wavlm.MergedWavLM` with ``merge_impl="fused"`` (see benchmarks/RESULTS.md):

- :class:`MergeWeight` builds W with in-place ``add_(ΔW_k, alpha=λ_k)`` (no λ_k·ΔW_k temporary) and returns
  dL/dλ_k = <dL/dW, ΔW_k> as a BLAS dot product (no dL/dW ⊙ ΔW_k temporary, no full set of weight gradients:
  each dL/dW is reduced to K numbers as soon as autograd produces it).
- :class:`RebuildMergedInBackward` is a saved-tensor hook: when an op that consumes a merged W (linear, conv,
  the attention projections inside ``F.multi_head_attention_forward``, layer/group norm) saves W (or a view
  of it) for its backward, it stores a recipe instead, and W is rebuilt from W_base, ΔW and the same λ
  values when the backward needs it. So no merged weight outlives its group's forward, while activations
  are kept (unlike gradient checkpointing, nothing but the merge is recomputed).
"""
import torch
from torch.func import functional_call


def merge_values(base, deltas, coeffs):
    """W_base + Σ_k c_k ΔW_k in ``base``'s dtype (ΔW may be stored in a lower precision)."""
    w = torch.add(base, deltas[0].to(base.dtype), alpha=coeffs[0])
    for d, c in zip(deltas[1:], coeffs[1:]):
        w.add_(d.to(base.dtype), alpha=c)
    return w


class MergeWeight(torch.autograd.Function):
    """W = W_base + Σ_k λ_k ΔW_k with gradient only for λ ([K]); W_base and ΔW are frozen."""

    @staticmethod
    def forward(ctx, lam, base, *deltas):
        ctx.save_for_backward(*deltas)
        return merge_values(base, deltas, lam.tolist())

    @staticmethod
    def backward(ctx, grad_w):
        g = grad_w.reshape(-1)
        grads = [torch.dot(g, d.reshape(-1).to(g.dtype)) for d in ctx.saved_tensors]
        return (torch.stack(grads), None) + (None,) * len(grads)


class RebuildMergedInBackward(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, a saved merged weight (any view of its storage) becomes a recipe.

    ``sources``: {name: (base, [ΔW_k])}; ``merged``: {name: W} built from them with ``coeffs`` (λ_k values).
    Only active while the merged tensors are alive (one group's forward), so storage addresses are unique.
    """

    def __init__(self, merged, sources, coeffs):
        by_ptr = {w.untyped_storage().data_ptr(): name for name, w in merged.items() if w.numel()}
        coeffs = list(coeffs)

        def pack(t):
            if t.layout == torch.strided and t.numel():
                name = by_ptr.get(t.untyped_storage().data_ptr())
                if name is not None:
                    return _Recipe(name, t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(x):
            if isinstance(x, _Recipe):
                base, deltas = sources[x.name]
                with torch.no_grad():
                    w = merge_values(base, deltas, coeffs)
                return w.as_strided(x.size, x.stride, x.offset)
            return x

        super().__init__(pack, unpack)


class _Recipe:
    __slots__ = ("name", "size", "stride", "offset")

    def __init__(self, name, size, stride, offset):
        self.name, self.size, self.stride, self.offset = name, size, stride, offset


def fused_call(module, sources, lam, args, kwargs, rebuild_in_backward=True):
    """Run ``module`` with merged weights {name: W_base + Σ_k lam[k] ΔW_k} built from ``sources``.

    ``lam``: [K] tensor (this group's column of λ). ``rebuild_in_backward=False`` when the caller already
    recomputes the whole group in backward (gradient checkpointing), whose own saved-tensor hooks must apply.
    """
    merged = {name: MergeWeight.apply(lam, base, *deltas) for name, (base, deltas) in sources.items()}
    if not (rebuild_in_backward and torch.is_grad_enabled() and lam.requires_grad):
        return functional_call(module, merged, args, kwargs)
    with RebuildMergedInBackward(merged, sources, lam.tolist()):
        return functional_call(module, merged, args, kwargs)
