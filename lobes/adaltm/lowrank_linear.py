"""Exact dL/dλ for low-rank task vectors without any weight-gradient GEMM (``merge_impl: lowrank``).

With ΔW_k = U_k V_kᵀ (rank r_k, :mod:`lobes.adaltm.low_rank`), a linear layer y_t = W x_t + b with
W = W_base + Σ_k λ_k U_k V_kᵀ has

    dL/dλ_k = Σ_t <δ_t, U_k V_kᵀ x_t> = Σ_t (U_kᵀ δ_t) · (V_kᵀ x_t)          (δ_t = dL/dy_t)

so the layer keeps only the r-wide projections p_t = Vᵀ x_t for backward (not x_t, not W), and backward needs
dX = δ W_base + Σ_k λ_k (δ U_k) V_kᵀ and the products δ U_k, both r-wide GEMMs beside the one dX GEMM: no dL/dW
is ever formed. The K vectors' factors of one weight are stored side by side, U = [U_1 | … | U_K] [out, R] and
V = [V_1 | … | V_K] [in, R] (R = Σ r_k), with λ repeated r_k times (``ranks``: host ints, so no device read).

Conv layers (the CNN feature extractor) are the same with V as an r-channel kernel: p = conv(x, V) [B, R, T'];
their dX comes from the merged kernel, rebuilt in backward (one [out, R] x [R, in·k] GEMM, small next to the
convolution). The weight-normed positional conv is not routed here (its merge is not linear in λ): its
factored ΔV is expanded and merged by plain autograd (the reference path), like biases and norms.

:class:`LowRankOps` routes, while a merge group runs, every ``F.linear`` / ``F.conv1d`` whose weight is one of
the group's factored base weights to these functions. WavLM's attention passes its q/k/v/out weights straight to
``F.multi_head_attention_forward``, whose projections a mode cannot reach (the mode is off while it handles a
call), so that call is run by :func:`self_attention`: the same steps as torch's function for WavLM's case
(self-attention, separate projection weights, float position-bias mask + key padding mask, no attention weights
returned), with the four projections routed.
"""
import contextlib
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def expand_lambda(lam, ranks):
    """[K] λ -> [R]: λ_k repeated r_k times (a device op; ``ranks`` are host ints)."""
    return torch.cat([lam[k].expand(r) for k, r in enumerate(ranks)]) if ranks else lam[:0]


def _lambda_grad(du, p, ranks, dtype, dim=-1):
    """dL/dλ_k = Σ over tokens and the k-th r_k columns (along ``dim``) of (δ U) ⊙ p, reduced in λ's dtype."""
    prod = du.to(dtype) * p.to(dtype)
    s = prod.sum([d for d in range(prod.dim()) if d != dim % prod.dim()])
    return torch.stack([c.sum() for c in s.split(list(ranks))])


def _single(x):
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


def _conv1d_input_grad(dy, w, length, stride, padding, dilation):
    """dL/dx of ``conv1d`` (groups = 1) as the transposed convolution, one kernel that accumulates in fp32. Not
    ``torch.nn.grad.conv1d_input``: it hands ``convolution_backward`` a stride-0 dummy input of x's shape, which
    that makes contiguous, twice (4 x-sized blocks alive on CPU; 150 MiB of them for the CNN's second conv at
    2 x 4 s, benchmarks/RESULTS.md section 11); this keeps 3. One GEMM per kernel tap summed in place keeps 1.6 but
    was 23% slower over the CNN (367 vs 298 ms per step at 2 x 4 s, 2 threads), and the step's live peak is at the
    start of the backward, not in the CNN's (section 11), so the faster kernel costs no peak memory."""
    stride, padding, dilation = _single(stride), _single(padding), _single(dilation)
    out_pad = length - ((dy.shape[-1] - 1) * stride - 2 * padding + dilation * (w.shape[-1] - 1) + 1)
    return F.conv_transpose1d(dy, w, None, stride, padding, out_pad, 1, dilation)


class LowRankLinear(torch.autograd.Function):
    """y = x Wᵀ + b, W = W_base + U diag(λ_r) Vᵀ; gradients for x, λ ([K]) and b only."""

    @staticmethod
    def forward(ctx, x, lam, base, bias, u, v, ranks):
        lam_r = expand_lambda(lam, ranks).to(base.dtype)
        uf, vf = u.to(base.dtype), v.to(base.dtype)  # factors may be stored in bf16 (delta_dtype)
        p = F.linear(x, vf.T)  # r-wide projections Vᵀ x_t: all that backward keeps of x
        if x.numel() // x.shape[-1] < base.shape[1]:
            # fewer tokens than inputs: (p λ) Uᵀ on the tokens (tokens x R x out) is cheaper than building the
            # merged weight (out x in x R), and p is computed anyway
            y = F.linear(x, base, bias)
            y.view(-1, y.shape[-1]).addmm_((p * lam_r.to(p.dtype)).view(-1, p.shape[-1]), uf.T.to(y.dtype))
        else:
            y = F.linear(x, torch.addmm(base, uf * lam_r, vf.T), bias)  # merged weight alive only in this call
        ctx.save_for_backward(p, base, u, v, lam_r)
        ctx.ranks, ctx.x_dtype, ctx.lam_dtype = tuple(ranks), x.dtype, lam.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        p, base, u, v, lam_r = ctx.saved_tensors
        cd = dy.dtype  # bf16 under autocast: every operand in the gradient's dtype
        du = dy @ u.to(cd)
        dx = None
        if ctx.needs_input_grad[0]:
            # accumulated in place: one [tokens, in] tensor, not a second one for the sum
            dx = (dy @ base.to(cd)).reshape(-1, base.shape[1])
            dx.addmm_((du * lam_r.to(cd)).reshape(-1, u.shape[1]), v.to(cd).T)
            dx = dx.view(*dy.shape[:-1], base.shape[1]).to(ctx.x_dtype)
        dlam = _lambda_grad(du, p, ctx.ranks, ctx.lam_dtype) if ctx.needs_input_grad[1] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return dx, dlam, None, dbias, None, None, None


class LowRankConv1d(torch.autograd.Function):
    """conv1d(x, W, b), W = W_base + (U diag(λ_r) Vᵀ).view(W.shape) (groups = 1)."""

    @staticmethod
    def forward(ctx, x, lam, base, bias, u, v, ranks, stride, padding, dilation):
        lam_r = expand_lambda(lam, ranks).to(base.dtype)
        uf, vf = u.to(base.dtype), v.to(base.dtype)
        w = torch.addmm(base.reshape(base.shape[0], -1), uf * lam_r, vf.T).view(base.shape)
        y = F.conv1d(x, w, bias, stride, padding, dilation)
        p = F.conv1d(x, vf.T.reshape(v.shape[1], *base.shape[1:]), None, stride, padding, dilation)
        ctx.save_for_backward(p, base, u, v, lam_r)
        ctx.conf = (tuple(ranks), x.shape, x.dtype, lam.dtype, stride, padding, dilation)
        return y

    @staticmethod
    def backward(ctx, dy):
        p, base, u, v, lam_r = ctx.saved_tensors
        ranks, x_shape, x_dtype, lam_dtype, stride, padding, dilation = ctx.conf
        cd = dy.dtype
        du = torch.matmul(u.to(cd).T, dy)  # Uᵀ δ_t per frame [B, R, T'], like p (no channels-last copy of δ)
        dx = None
        if ctx.needs_input_grad[0]:  # the CNN's first conv reads the waveform: no dX there
            w = torch.addmm(base.reshape(base.shape[0], -1), u.to(base.dtype) * lam_r, v.to(base.dtype).T)
            w = w.view(base.shape).to(cd)
            dx = _conv1d_input_grad(dy, w, x_shape[-1], stride, padding, dilation).to(x_dtype)
        dlam = _lambda_grad(du, p, ranks, lam_dtype, dim=1) if ctx.needs_input_grad[1] else None
        dbias = dy.sum((0, 2)) if ctx.needs_input_grad[3] else None
        return dx, dlam, None, dbias, None, None, None, None, None, None


class GeluOfGroupNorm(torch.autograd.Function):
    """gelu(h) for h = group_norm(x) (the GroupNorm CNN's first layer). Keeps x, which GroupNorm saves anyway,
    instead of h, and gives dL/dh one utterance at a time from h_b recomputed from x_b (the same kernel on the
    same values under the forward's autocast): the pair saves one x-sized tensor instead of two, and its
    backward holds three instead of four (50 MiB each at 2 x 4 s; benchmarks/RESULTS.md section 11)."""

    @staticmethod
    def forward(ctx, h, x, groups, weight, bias, eps):
        ctx.save_for_backward(x, weight, bias)
        dev = x.device.type
        autocast = (dev, torch.get_autocast_dtype(dev)) if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) \
            else None
        ctx.conf = (groups, eps, h.dtype, autocast)
        return F.gelu(h)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        groups, eps, dtype, autocast = ctx.conf
        dh = torch.empty_like(dy)
        for b in range(x.shape[0]):  # group norm is per utterance: recompute h one utterance at a time
            with torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext():
                h = F.group_norm(x[b:b + 1], groups, weight, bias, eps)  # as the forward ran it
            dh[b:b + 1] = torch.ops.aten.gelu_backward(dy[b:b + 1], h.to(dtype))
            del h  # before the next utterance's h exists
        return dh, None, None, None, None, None


class LowRankOps(TorchFunctionMode):
    """Within this context, ``F.linear`` / ``F.conv1d`` on a routed weight run :class:`LowRankLinear` /
    :class:`LowRankConv1d`, WavLM's attention call runs :func:`self_attention`, and GELU straight on a group_norm
    output runs :class:`GeluOfGroupNorm` (saves GroupNorm's input only).

    ``routes``: {id(base weight Parameter): (λ column [K], U [out, R], V [in, R], ranks)}. Keyed by object
    identity: the module reads its own stored W_base Parameter (it is not passed to ``functional_call``).
    """

    def __init__(self, routes):
        super().__init__()
        self.routes = routes
        self._group_norm = None  # (weakref to the last group_norm output, its x, groups, weight, bias, eps)

    def linear(self, x, w, b=None):
        route = self.routes.get(id(w))
        if route is None:
            return F.linear(x, w, b)
        lam, u, v, ranks = route
        # 2-D inside the Function, reshaped outside it: F.linear on a 3-D input returns a view, and a view made
        # inside a custom Function may not be edited in place (WavLM zeroes padded frames in place)
        y = LowRankLinear.apply(x.reshape(-1, x.shape[-1]), lam, w, b, u, v, ranks)
        return y.view(*x.shape[:-1], y.shape[-1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = _bind(("input", "weight", "bias"), args, kwargs)
            if id(bound["weight"]) in self.routes:
                return self.linear(bound["input"], bound["weight"], bound.get("bias"))
        elif func is F.conv1d:
            bound = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
            route = self.routes.get(id(bound["weight"]))
            if route is not None:
                if bound.get("groups", 1) != 1 or isinstance(bound.get("padding", 0), str):
                    raise NotImplementedError("merge_impl lowrank: only groups=1 convolutions with numeric padding")
                lam, u, v, ranks = route
                return LowRankConv1d.apply(bound["input"], lam, bound["weight"], bound.get("bias"), u, v, ranks,
                                           bound.get("stride", 1), bound.get("padding", 0), bound.get("dilation", 1))
        elif func is F.group_norm:
            out = func(*args, **kwargs)
            b = _bind(("input", "num_groups", "weight", "bias", "eps"), args, kwargs)
            self._group_norm = (weakref.ref(out), b["input"], b["num_groups"], b.get("weight"), b.get("bias"),
                                b.get("eps", 1e-5))
            return out
        elif func is F.gelu:  # gelu straight on the last group_norm's output: keep x, not h (GeluOfGroupNorm)
            gn, self._group_norm = self._group_norm, None
            if (gn is not None and len(args) == 1 and gn[0]() is args[0] and kwargs.get("approximate", "none") == "none"
                    and torch.is_grad_enabled() and args[0].requires_grad):
                return GeluOfGroupNorm.apply(args[0], *gn[1:])
        elif func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            if id(bound.arguments["q_proj_weight"]) in self.routes:
                return self_attention(self.linear, bound.arguments)
        return func(*args, **kwargs)


def _bind(names, args, kwargs):
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def self_attention(linear, a):
    """torch's ``F.multi_head_attention_forward`` for WavLM's call (see the module docstring), with the four
    projections through ``linear``. Any other use of the function is refused rather than approximated."""
    if not (a["use_separate_proj_weight"] and a["bias_k"] is None and a["bias_v"] is None
            and not a["add_zero_attn"] and a["static_k"] is None and a["static_v"] is None
            and not a["is_causal"] and not a["need_weights"] and not (a["training"] and a["dropout_p"] > 0)
            and a["query"] is a["key"] is a["value"] and a["query"].dim() == 3):
        raise NotImplementedError("merge_impl lowrank supports WavLM's self-attention call only (no attention "
                                  "weights, no dropout, no bias_k/bias_v)")
    x = a["query"]
    tgt, bsz, embed = x.shape
    heads = a["num_heads"]
    head_dim = embed // heads
    b_q, b_k, b_v = a["in_proj_bias"].chunk(3)
    q, k, v = (linear(x, a[f"{n}_proj_weight"], b) for n, b in (("q", b_q), ("k", b_k), ("v", b_v)))
    mask, kpm = a["attn_mask"], a["key_padding_mask"]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    q, k, v = (t.view(tgt, bsz * heads, head_dim).transpose(0, 1) for t in (q, k, v))
    if kpm is not None:
        if kpm.dtype == torch.bool:
            kpm = torch.zeros_like(kpm, dtype=x.dtype).masked_fill_(kpm, float("-inf"))
        kpm = kpm.view(bsz, 1, 1, tgt).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, tgt)
        mask = kpm if mask is None else mask + kpm
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.size(0) == 1 and mask.dim() == 3 else mask.view(bsz, heads, -1, tgt)
    q, k, v = (t.view(bsz, heads, tgt, head_dim) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
    out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt, embed)
    out = linear(out, a["out_proj_weight"], a["out_proj_bias"])
    return out.view(tgt, bsz, out.size(1)), None


# ------------------------------------------------------------------------ MergedWavLM, merge_impl "lowrank"
def _routable(model, key):
    """Whether ``key`` is the weight of a plain Linear or a groups=1 Conv1d (the ops routed here)."""
    path, local = model._base[key]
    mod_path, _, pname = local.rpartition(".")
    root = model.model.get_submodule(path).inner if path else model.model
    module = root.get_submodule(mod_path) if mod_path else root
    if pname != "weight" or torch.nn.utils.parametrize.is_parametrized(module):
        return False
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv1d) and module.groups == 1)


def setup_factors(model):
    """Concatenate each key's K factors into U [out, R], V [in, R] (frozen Parameters, like ΔW) and record the
    ranks (host ints) and which keys are routed to the no-dW functions."""
    lists = model.__dict__.pop("_factor_lists", {})
    model.lowrank_factors = torch.nn.ParameterDict()
    model.lowrank_ranks, model.lowrank_routed = {}, set()
    for key in list(lists):
        pairs = lists.pop(key)
        name = key.replace(".", "__")
        for i, suffix in enumerate(("__U", "__V")):
            model.lowrank_factors[name + suffix] = torch.nn.Parameter(
                torch.cat([pair[i] for pair in pairs], 1).contiguous(), requires_grad=False)
        model.lowrank_ranks[key] = tuple(u.shape[1] for u, _ in pairs)
        # a zero ΔW in every vector (rank 0: the CNN that the fine-tuning recipes freeze) has no r-wide path; a
        # conv with 0 output channels is an error, so it is merged by autograd (W_base + an empty product)
        if sum(model.lowrank_ranks[key]) > 0 and _routable(model, key):
            model.lowrank_routed.add(key)


def merged_factored(model, key, lam):
    """W_base + Σ_k λ_k U_k V_kᵀ of one factored key, plain autograd in λ (fold, export, non-routed keys)."""
    name, base = key.replace(".", "__"), model.base_parameter(key)
    u, v = model.lowrank_factors[name + "__U"], model.lowrank_factors[name + "__V"]
    lam_r = expand_lambda(lam[:, model.group_of[key]], model.lowrank_ranks[key]).to(base.dtype)
    return base + ((u.to(base.dtype) * lam_r) @ v.to(base.dtype).T).view(base.shape)


def lowrank_call(model, group, args, kwargs):
    """Run one merge group: routed weights through :class:`LowRankOps`, the rest merged by autograd."""
    from torch.func import functional_call

    n = len(group.prefix) + 1
    keys = [k for k in model.keys if k.startswith(group.prefix + ".")]
    lam = model.lambdas()
    col = lam[:, model.group_of[keys[0]]]  # every key of a wrapped module is in one group
    params, routes = {}, {}
    for k in keys:
        if k in model.lowrank_routed:
            name = k.replace(".", "__")
            routes[id(model.base_parameter(k))] = (col, model.lowrank_factors[name + "__U"],
                                                   model.lowrank_factors[name + "__V"], model.lowrank_ranks[k])
        else:
            params[k[n:]] = model.merged_weight(k, lam)
    with LowRankOps(routes):
        return functional_call(group.inner, params, args, kwargs)
