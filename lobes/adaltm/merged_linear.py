"""Fused eq. (4) for λ-training: the linear combination W = W_base + Σ_k λ_k ΔW_k as one autograd node,
and merged weights that are rebuilt in backward instead of being kept alive by the ops that use them.

Used by :class:`lobes.adaltm.merged_wavlm.MergedWavLM` with ``merge_impl="fused"`` and ``"materialized"`` (see
benchmarks/RESULTS.md):

- :class:`MergeWeight` builds W in one pass and returns dL/dλ = [<dL/dW, ΔW_k>]_k without a dL/dW ⊙ ΔW_k
  temporary and without a full set of weight gradients (each dL/dW is reduced to K numbers as soon as
  autograd produces it). When the K task vectors of a weight lie in one [K, n] tensor (the layout
  MergedWavLM loads them into for ``fused`` / ``materialized``), both are single BLAS GEMV calls: W = addmv(W_base,
  ΔWᵀ, λ) reads every ΔW once (vs. 2 passes and a λ_k·ΔW_k temporary per vector with plain autograd),
  and dL/dλ = mv(ΔW, dL/dW) reads dL/dW once for all K. :class:`MaterializedWeight` attaches the same λ
  gradient to weights that already hold the merge (:func:`merge_into`).
- :class:`RebuildMergedInBackward` is a saved-tensor hook: when an op that consumes a merged W (linear, conv,
  the attention projections inside ``F.multi_head_attention_forward``, layer/group norm) saves W (or a view
  of it) for its backward, it stores a recipe instead, and W is rebuilt from W_base, ΔW and the same λ
  values when the backward needs it. So no merged weight outlives its group's forward, while activations
  are kept (unlike gradient checkpointing, nothing but the merge is recomputed).

λ is a tensor on the weights' device everywhere here (never a Python list read back from it): on a GPU a
``.tolist()`` per group per step is a host sync that stalls the CUDA stream, and a λ built on the host next
to CUDA weights is a device mix. tests/test_device_meta.py runs every recipe on the ``meta`` device to keep it so.
"""
import warnings

import torch
from torch.func import functional_call


def stacked_view(deltas):
    """The ΔW_k as one [K, n] matrix view when they are equally spaced contiguous slices of one storage
    (the layout MergedWavLM loads ``fused`` / ``materialized`` ΔW into), else None (e.g. after ``.double()``,
    which copies each one)."""
    d0 = deltas[0]
    if not all(d.is_contiguous() and d.shape == d0.shape and d.dtype == d0.dtype for d in deltas):
        return None
    n = d0.numel()
    if len(deltas) == 1:
        return d0.view(1, n)
    if any(d.untyped_storage().data_ptr() != d0.untyped_storage().data_ptr() for d in deltas):
        return None
    step = deltas[1].storage_offset() - d0.storage_offset()
    if step < n or any(d.storage_offset() - d0.storage_offset() != k * step for k, d in enumerate(deltas)):
        return None
    return d0.as_strided((len(deltas), n), (step, 1), d0.storage_offset())


def lam_vector(coeffs, base):
    """The [K] coefficients as a detached tensor in ``base``'s dtype. A tensor keeps its device (a λ on
    another device than the weights is a bug the merge must raise on, not hide by copying); a list of numbers
    (host values) is placed on ``base``'s device."""
    if isinstance(coeffs, torch.Tensor):
        return coeffs.detach().to(dtype=base.dtype)
    return torch.tensor(list(coeffs), dtype=base.dtype, device=base.device)


def merge_values(base, deltas, coeffs, dtype=None):
    """W_base + Σ_k c_k ΔW_k in ``dtype`` (default ``base``'s; ΔW may be stored in a lower precision);
    ``coeffs``: [K] tensor on ``base``'s device (or a list of numbers).

    With the stacked layout the GEMV runs in ``dtype`` on inputs cast to it, which is what CUDA's autocast
    makes of ``addmv`` in a bf16 region: the backward rebuild of a merged W (:class:`RebuildMergedInBackward`)
    passes the dtype the forward produced, so the rebuilt W is the forward's, bit for bit."""
    dtype = base.dtype if dtype is None else dtype
    lam = lam_vector(coeffs, base)
    stacked = stacked_view(deltas)
    if stacked is not None:
        return torch.addmv(base.reshape(-1).to(dtype), stacked.to(dtype).t(), lam.to(dtype)).view(base.shape)
    w = torch.addcmul(base, deltas[0].to(base.dtype), lam[0])  # λ_k as a 0-dim device tensor: no host read
    for k in range(1, len(deltas)):
        w.addcmul_(deltas[k].to(base.dtype), lam[k])
    return w.to(dtype)


class MergeWeight(torch.autograd.Function):
    """W = W_base + Σ_k λ_k ΔW_k with gradient only for λ ([K]); W_base and ΔW are frozen."""

    @staticmethod
    def forward(ctx, lam, base, *deltas):
        ctx.save_for_backward(*deltas)
        ctx.lam_dtype = lam.dtype
        return merge_values(base, deltas, lam)

    @staticmethod
    def backward(ctx, grad_w):
        deltas = ctx.saved_tensors
        # dL/dλ in λ's dtype: under bf16 autocast dL/dW arrives in bf16 and ΔW may be fp32 (a GEMV needs one
        # dtype); a no-op in fp32
        g = grad_w.reshape(-1).to(ctx.lam_dtype)  # a linear's dL/dW arrives transposed: one copy, then contiguous
        stacked = stacked_view(deltas)
        if stacked is not None:
            grad_lam = torch.mv(stacked.to(g.dtype), g)
        else:
            grad_lam = torch.stack([torch.dot(g, d.reshape(-1).to(g.dtype)) for d in deltas])
        return (grad_lam, None) + (None,) * len(deltas)


class MaterializedWeight(MergeWeight):
    """merge_impl="materialized": the stored W already equals W_base + Σ_k λ_k ΔW_k (kept current by
    :func:`merge_into`), so the forward builds nothing; only the λ gradient of :class:`MergeWeight` is
    attached to it."""

    @staticmethod
    def forward(ctx, lam, merged, *deltas):
        ctx.save_for_backward(*deltas)
        ctx.lam_dtype = lam.dtype
        return merged.view_as(merged)


@torch.no_grad()
def merge_into(out, base, deltas, coeffs):
    """out <- W_base + Σ_k c_k ΔW_k, computed from W_base every time (never as an increment of ``out``), so
    the stored merge is bitwise the same whatever path λ took (exact resume, no rounding drift).
    ``coeffs``: [K] tensor on the weights' device (or a list of numbers)."""
    stacked = stacked_view(deltas)
    if stacked is not None and out.is_contiguous():
        torch.addmv(base.reshape(-1), stacked.to(base.dtype).t(), lam_vector(coeffs, base), out=out.view(-1))
        return
    out.copy_(merge_values(base, deltas, coeffs))


def materialized_call(module, sources, lam, args, kwargs):
    """Run ``module`` on its stored (already merged) weights, with dL/dλ attached when λ trains.

    ``sources``: {name: (stored merged W, [ΔW_k])}; ``lam``: [K] tensor (this group's column of λ).
    """
    if not (torch.is_grad_enabled() and lam.requires_grad):
        return module(*args, **kwargs)
    weights = {name: MaterializedWeight.apply(lam, w, *deltas) for name, (w, deltas) in sources.items()}
    return functional_call(module, weights, args, kwargs)


class RebuildMergedInBackward(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, a saved merged weight (any view of its storage) becomes a recipe.

    ``sources``: {name: (base, [ΔW_k])}; ``merged``: {name: W} built from them with ``coeffs`` ([K] λ).
    Only active while the merged tensors are alive (one group's forward), so storage addresses are unique.
    The recipe keeps a detached device copy of λ (not floats read back to the host, which would sync the GPU
    per group per step); a copy, since an optimizer updates λ in place and the rebuild must use the λ of the
    forward.

    Only the innermost saved-tensor hooks run, so the hooks active when this one is entered (the planner's
    ``SavedBytes``, torch's ``save_on_cpu``, ...) are handed every tensor kept as it is; without that they never
    saw a fused group's activations (the planner reported 0.22 GiB saved for backward at WavLM-Large shape
    instead of ~12 GiB, benchmarks/RESULTS.md §11).
    """

    def __init__(self, merged, sources, coeffs):
        # keyed by the storage object (StorageImpl address), not by data_ptr(): that is 0 for every tensor on
        # the meta device, where tests/test_device_meta.py runs this
        by_ptr = {w.untyped_storage()._cdata: name for name, w in merged.items() if w.numel()}
        coeffs = coeffs.detach().clone() if isinstance(coeffs, torch.Tensor) else list(coeffs)

        # the enclosing hooks, set on entering; a cell, not ``self``: a closure over self would make a reference
        # cycle (self -> pack -> self) that keeps λ's copy alive until the garbage collector runs
        self._outer = outer = [None]

        def pack(t):
            if t.layout == torch.strided and t.numel():
                name = by_ptr.get(t.untyped_storage()._cdata)
                if name is not None:
                    return _Recipe(name, t.size(), t.stride(), t.storage_offset(), t.dtype)
            return t if outer[0] is None else _Outer(outer[0][0](t), outer[0][1])

        def unpack(x):
            if isinstance(x, _Recipe):
                base, deltas = sources[x.name]
                with torch.no_grad():  # in the forward's dtype (bf16 under CUDA autocast, which runs addmv so)
                    w = merge_values(base, deltas, coeffs, x.dtype)
                return w.as_strided(x.size, x.stride, x.offset)
            return x.unpack(x.packed) if isinstance(x, _Outer) else x

        super().__init__(pack, unpack)

    def __enter__(self):
        self._outer[0] = _enclosing_hooks()
        return super().__enter__()


def _enclosing_hooks():
    """The innermost active saved-tensor hooks (pack, unpack), or None. torch has no public accessor (functorch
    reads the same private one; tests/test_saved_for_backward.py fails if it stops handing the tensors on). A torch
    without it still trains with the same λ gradient; only the enclosing hooks miss the fused groups' tensors."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        warnings.warn(f"torch {torch.__version__} has no torch._C._autograd._top_saved_tensors_default_hooks (the "
                      "toolkit pins torch==2.11.0): saved-tensor hooks around a fused λ group (tools.plan_memory's "
                      "count of saved tensors, torch's save_on_cpu) do not see its activations, so a memory plan "
                      "under-counts them", RuntimeWarning, stacklevel=3)
        return None
    return top(False)


class _Recipe:
    __slots__ = ("dtype", "name", "offset", "size", "stride")

    def __init__(self, name, size, stride, offset, dtype):
        self.name, self.size, self.stride, self.offset, self.dtype = name, size, stride, offset, dtype


class _Outer:
    """A tensor packed by the saved-tensor hooks that were active outside :class:`RebuildMergedInBackward`."""
    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack):
        self.packed, self.unpack = packed, unpack


def fused_call(module, sources, lam, args, kwargs, rebuild_in_backward=True):
    """Run ``module`` with merged weights {name: W_base + Σ_k lam[k] ΔW_k} built from ``sources``.

    ``lam``: [K] tensor (this group's column of λ). ``rebuild_in_backward=False`` when the caller already
    recomputes the whole group in backward (gradient checkpointing), whose own saved-tensor hooks must apply.
    """
    merged = {name: MergeWeight.apply(lam, base, *deltas) for name, (base, deltas) in sources.items()}
    if not (rebuild_in_backward and torch.is_grad_enabled() and lam.requires_grad):
        return functional_call(module, merged, args, kwargs)
    with RebuildMergedInBackward(merged, sources, lam):
        return functional_call(module, merged, args, kwargs)
