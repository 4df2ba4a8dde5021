"""Run a training step on PyTorch's ``meta`` device and count its memory; emulate CUDA's autocast there.

A meta tensor has a shape and a dtype but no data: a WavLM-Large step costs no compute, and every op checks
devices and dtypes as it would on CUDA. Used by the memory planner (``lobes.memory_plan``,
``tools/plan_memory.py``) and by the device test (``tests/test_device_meta.py``): one implementation.

- :class:`LiveMemory` (a ``TorchDispatchMode``): running total and peak of the live tensor storages.
- :class:`SavedBytes`: what autograd saves for backward.
- :class:`EmulatedAutocast`: ``torch.autocast``'s casting rules on any device (autocast ignores meta tensors),
  with the op lists of ATen's ``autocast_mode`` (CUDA or CPU), matched by op name as the dispatcher does.
- :func:`meta_values`: ``.item()`` / ``.tolist()`` / ``bool()`` / ``.cpu()`` of a meta tensor read as zeros.
- :func:`register_meta_ctc`: Meta kernels for ``aten::_ctc_loss`` (it has none).
"""
import contextlib
import weakref
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Python functions a TorchFunctionMode would see as one call: run with the mode kept on for the ops inside
# (F.multi_head_attention_forward holds the attention GEMMs; torch.autograd.backward every backward op)
_DECOMPOSE = {F.multi_head_attention_forward: F, torch.autograd.backward: torch.autograd}


def call_inside(mode, func, args, kwargs):
    """Run a Python-level torch function with ``mode`` active for the ops inside it."""
    if func in _DECOMPOSE:
        with mode, mock.patch.object(_DECOMPOSE[func], "has_torch_function", lambda *a, **k: False):
            return func(*args, **kwargs)
    return func(*args, **kwargs)


def tree_map(tree, fn):
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(x, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: tree_map(v, fn) for k, v in tree.items()}
    return fn(tree)


def tensors(tree):
    """The tensors in nested tuples / lists / dicts (a cheaper tree_flatten: it runs for every op)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from tensors(x)


def storages(ts):
    """{storage id: bytes} of distinct storages."""
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in ts}


class LiveMemory(TorchDispatchMode):
    """Running total and peak of the bytes of every tensor storage created under it and still alive.

    A storage counts from the op that creates it until the last tensor using it dies. Outputs that alias an
    input (views, in-place ops) add nothing; storages that existed before (parameters) are never counted.
    """

    def __init__(self):
        super().__init__()
        self.refs, self.size = {}, {}
        self.live = self.peak = self.largest = 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tensors((args, kwargs))}
        for t in tensors(out):
            key = t.untyped_storage()._cdata
            if key not in self.refs:
                if key in inputs:  # a view / in-place result of something created outside: not new memory
                    continue
                self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                self.live += self.size[key]
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, self.size[key])
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd saves for backward (distinct storages, ``exclude``d ones not): the activation memory."""

    def __init__(self, exclude):
        self.exclude, self.saved = set(exclude), {}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in self.exclude:
                self.saved[st._cdata] = st.nbytes()
            return t
        super().__init__(pack, lambda t: t)

    @property
    def total(self):
        return sum(self.saved.values())


class FollowMeta(TorchFunctionMode):
    """A small CPU tensor built from Python values that meets meta weights is moved to meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = list(tensors((args, kwargs)))
        if any(t.is_meta for t in found) and any(t.device.type == "cpu" for t in found):
            args, kwargs = tree_map((args, kwargs), lambda x: x.to("meta") if isinstance(x, torch.Tensor)
                                    and x.device.type == "cpu" and x.dim() > 0 else x)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_values():
    """``.tolist()`` / ``.item()`` / ``bool()`` / ``.cpu()`` of a meta tensor read as zeros: memory never
    depends on values. Patched on ``torch.Tensor`` rather than done by a function mode, which would run for
    every op of every meta kernel (10x slower)."""
    orig = {k: getattr(torch.Tensor, k) for k in ("tolist", "item", "__bool__", "cpu")}

    def tolist(t):
        return torch.zeros(t.shape, dtype=t.dtype, device="cpu").tolist() if t.is_meta else orig["tolist"](t)

    def item(t):
        return 0 if t.is_meta else orig["item"](t)

    def as_bool(t):
        return False if t.is_meta else orig["__bool__"](t)

    def cpu(t, *args, **kwargs):
        return torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else orig["cpu"](t, *args, **kwargs)
    with mock.patch.object(torch.Tensor, "tolist", tolist), mock.patch.object(torch.Tensor, "item", item), \
            mock.patch.object(torch.Tensor, "__bool__", as_bool), mock.patch.object(torch.Tensor, "cpu", cpu):
        yield


# ---------------------------------------------------------------------------------------------- autocast
# ATen's autocast op lists (aten/src/ATen/autocast_mode.h / .cpp, torch 2.x), by op name. A Python operator
# (x @ w, x ** 2) reaches the mode as __matmul__ / __pow__: listed under the aten op it runs.
_CUDA_LOW = {
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "cudnn_convolution", "cudnn_convolution_transpose", "prelu", "addmm",
    "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linalg_vecdot", "vecdot",
    "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention"}
_CUDA_F32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "native_layer_norm", "group_norm",
    "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
    "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
    "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "norm", "cross_entropy"}  # norm: fp32_append_dtype; cross_entropy: log_softmax + nll_loss, both fp32
# fp32 unless the call names a dtype
_CUDA_F32_OPT_DTYPE = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
                       "vector_norm", "linalg_matrix_norm", "matrix_norm", "sum"}
_CUDA_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
                 "tensordot", "scatter_add"}
_CPU_LOW = {
    "conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "vecdot", "baddbmm", "addmm", "addbmm", "linear",
    "_convolution", "matmul", "__matmul__", "__rmatmul__", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
    "_native_multi_head_attention"}
_CPU_F32 = {
    "avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile", "nanquantile", "stft",
    "cdist", "trace", "mse_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss",
    "poisson_nll_loss", "smooth_l1_loss", "cross_entropy", "l1_loss", "huber_loss", "margin_ranking_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "ctc_loss", "kl_div",
    "multilabel_margin_loss", "binary_cross_entropy_with_logits", "max_pool3d", "adaptive_avg_pool3d"}
POLICIES = {"cuda": (_CUDA_LOW, _CUDA_F32, _CUDA_F32_OPT_DTYPE, _CUDA_PROMOTE),
            "cpu": (_CPU_LOW, _CPU_F32, set(), {"stack", "cat", "index_copy"})}
_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # float64 is never autocast


class EmulatedAutocast(TorchFunctionMode):
    """``torch.autocast(dtype=bfloat16)``'s casting rules for tensors on any device (meta included).

    Works above autograd, as autocast does, so autograd saves the cast inputs. ``policy`` picks the op lists
    of CUDA or of CPU autocast. As with autocast: in-place ops and ``out=`` calls are not cast, an explicit
    ``dtype=`` wins over fp32_set_opt_dtype, and the cast of a leaf that requires grad is cached for the
    region. Like autocast it is off in backward when backward runs outside the region (the recipes' case).
    """

    def __init__(self, policy="cuda", dtype=torch.bfloat16):
        super().__init__()
        self.low, self.f32, self.f32_opt, self.promote = POLICIES[policy]
        self.dtype, self.cache = dtype, {}

    def __exit__(self, *exc):
        self.cache.clear()
        return super().__exit__(*exc)

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.dtype in _ELIGIBLE and x.dtype != dtype):
            return x
        if x.is_leaf and x.requires_grad:
            key = (id(x), dtype)
            if key not in self.cache:
                self.cache[key] = (x, x.to(dtype))
            return self.cache[key][1]
        return x.to(dtype)

    def target(self, name, args, kwargs):
        """The dtype this op's floating inputs are cast to, or None."""
        if "out" in kwargs:
            return None
        if name in self.low:
            return self.dtype
        if name in self.f32 or (name in self.f32_opt and kwargs.get("dtype") is None):
            return torch.float32
        if name in self.promote:
            found = [t.dtype for t in tensors((args, kwargs)) if t.dtype in _ELIGIBLE]
            return torch.float32 if torch.float32 in found else None
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.target(getattr(func, "__name__", ""), args, kwargs)
        if dtype is not None:
            args, kwargs = tree_map((args, kwargs), lambda x: self._cast(x, dtype))
        return call_inside(self, func, args, kwargs)


@contextlib.contextmanager
def checkpoint_recomputes_emulated():
    """Gradient checkpointing recomputes a segment in backward under the autocast state of its forward
    (torch.utils.checkpoint records torch's autocast flags); an :class:`EmulatedAutocast` is no torch flag, so
    within this context a non-reentrant checkpoint made under one re-enters it for the recomputation (else the
    recomputed tensors would be fp32 where the forward's were bf16)."""
    import torch.utils.checkpoint as ckpt
    from torch.overrides import _get_current_function_mode_stack

    real = ckpt._checkpoint_without_reentrant_generator

    def generator(fn, *args, **kwargs):
        mode = next((m for m in reversed(_get_current_function_mode_stack()) if isinstance(m, EmulatedAutocast)),
                    None)
        if mode is not None:
            inner = fn

            def fn(*a, **k):
                if any(m is mode for m in _get_current_function_mode_stack()):
                    return inner(*a, **k)  # the forward itself
                with mode:  # the recomputation in backward
                    return inner(*a, **k)
        return real(fn, *args, **kwargs)
    with mock.patch.object(ckpt, "_checkpoint_without_reentrant_generator", generator):
        yield


_SAME_DTYPE_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "addr",
                   "convolution", "convolution_backward", "_scaled_dot_product_efficient_attention",
                   "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"}


class SameDtypeCheck(TorchDispatchMode):
    """The operand-dtype check of the CUDA / CPU GEMM, convolution and attention kernels, which their meta
    kernels skip (a meta ``mm`` of bf16 and fp32 returns fp32): a mix raises here as on CUDA ("expected m1 and
    m2 to have the same dtype"). Below autograd, so backward's ops are checked too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SAME_DTYPE_OPS:
            found = {t.dtype for t in tensors((args, kwargs)) if t.is_floating_point()}
            if len(found) > 1:
                raise RuntimeError(f"{func}: expected operands of the same dtype (as CUDA's kernel checks: "
                                   f"'expected m1 and m2 to have the same dtype'), got {sorted(map(str, found))}")
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- CTC on meta
_ctc_lib = None


def _same_device(*ts):
    devs = {t.device for t in ts if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(devs) > 1:
        raise RuntimeError(f"CTC loss: tensors on different devices: {sorted(map(str, devs))}")


def register_meta_ctc():
    """Meta kernels for ``_ctc_loss`` / ``_ctc_loss_backward`` (idempotent), checking devices as the CUDA ones
    do (the length vectors may stay on the host). Shapes as the CUDA kernels: loss [B], log_alpha [B, T, 2S+1]."""
    global _ctc_lib
    if _ctc_lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")

    def ctc_meta(log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
        _same_device(log_probs, targets)
        t, b, _ = log_probs.shape
        return log_probs.new_empty(b), log_probs.new_empty(b, t, 2 * targets.shape[-1] + 1)

    def ctc_bwd_meta(grad, log_probs, targets, input_lengths, target_lengths, nll, log_alpha, blank,
                     zero_infinity=False):
        _same_device(grad, log_probs, targets, nll, log_alpha)
        return torch.empty_like(log_probs)

    lib.impl("_ctc_loss.Tensor", ctc_meta, "Meta")
    lib.impl("_ctc_loss_backward.Tensor", ctc_bwd_meta, "Meta")
    _ctc_lib = lib  # the registration lives as long as this object


def meta_safe_autocast(real=torch.autocast):
    """``torch.autocast`` that accepts a disabled autocast on "meta". HF's rotary embedding opens
    ``torch.autocast(device_type=x.device.type, enabled=False)``, which torch refuses for "meta"; a disabled
    autocast does nothing on any device, so on meta it becomes a no-op."""
    def autocast(device_type, *args, enabled=True, **kwargs):
        if device_type == "meta" and not enabled:
            return contextlib.nullcontext()
        return real(device_type, *args, enabled=enabled, **kwargs)
    return autocast


@contextlib.contextmanager
def disabled_autocast_on_meta():
    """Within it, ``torch.autocast`` is :func:`meta_safe_autocast`."""
    with mock.patch.object(torch, "autocast", meta_safe_autocast(torch.autocast)):
        yield


@contextlib.contextmanager
def meta_nonzero():
    """Ops whose output shape depends on values (``nonzero``, boolean-mask selection) run on meta as if every
    element were true (the largest output: the memory worst case)."""
    import torch.fx.experimental._config as config

    saved, config.meta_nonzero_assume_all_nonzero = config.meta_nonzero_assume_all_nonzero, True
    try:
        yield
    finally:
        config.meta_nonzero_assume_all_nonzero = saved
