"""A frozen WavLM whose weights are the task-vector merge of eq. (4), with learnable λ.

    W_merged^(l) = W_base^(l) + Σ_k λ_k^(l) ΔW_k^(l)           (eq. 4; k ∈ {ASR, SER}, l = merge group)

How it runs: each merge group's submodule (the CNN block, each transformer layer, ...) is wrapped so that it
runs with its group's merged weights. W_base and every ΔW stay frozen; only λ receives gradients
(dL/dλ_k^(l) = Σ_{W in group l} <dL/dW, ΔW_k>). The YAML's ``merge_impl`` picks, once, one of three
implementations of the same math (:class:`MergeStrategy`; benchmarks/RESULTS.md section 1 has each one's time and
memory against full fine-tuning, and the row that keeps it):

- ``materialized`` (:class:`MaterializedMerge`, default): the model's stored weights *are* W_merged for the current
  λ, recomputed from a kept copy of W_base when λ has moved. Kept for time: row ``materialized`` 1.01× / 0.96×
  median of full fine-tuning, the fastest λ step (fewest merge passes in the profile).
- ``fused`` (:class:`FusedMerge`): W_merged built per group just before it runs and rebuilt in backward
  (lobes.adaltm.merged_linear). Kept for memory: rows ``fused_gc_bf16`` (0.77× peak, the only one ≤ 0.8×),
  ``fused_bf16`` (0.84×) and ``fused_bf16_cnngc`` (0.81× peak at 0.95× time).
- ``functional`` (:class:`FunctionalMerge`): plain autograd through W_base + Σ λ ΔW with
  ``torch.func.functional_call``. The reference (oracle) the others are tested against
  (tests/test_merged_linear.py); it wins no row.
- ``lowrank`` (:class:`LowRankMerge`, beyond the paper, needs ``delta_rank``): ΔW_k = U_k V_kᵀ truncated
  (lobes.adaltm.low_rank); linear and CNN layers keep only Vᵀx for backward and give dL/dλ without any dW GEMM
  (lobes.adaltm.lowrank_linear). benchmarks/RESULTS.md, "Low-rank task vectors".

``delta_rank`` (int rank, energy fraction or None) truncates the task vectors for every implementation, so
``functional`` on the same truncated vectors is the reference ``lowrank`` is tested against.

With ``gradient_checkpointing`` each group is recomputed in backward (less activation memory).

The backbone is kept in eval mode (no dropout): it is a frozen feature extractor, as in the paper, and this
makes its features deterministic (needed for feature caching of static merges).
"""
import os
import weakref

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from lobes.adaltm import layer_groups, low_rank, lowrank_linear, merged_linear
from lobes.adaltm.merge_coefficients import MergeCoefficients
from lobes.errors import DataError
from lobes.wavlm_encoder import WavLMShape, load_wavlm, run_wavlm


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc only). Loading task vectors frees hundreds of MB in
    blocks under glibc's dynamic mmap threshold, which stay in the process's resident size otherwise."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _resolve_vector(name, vec):
    """Accept a path to a saved task vector, a TaskVector, or a plain {key: tensor} dict."""
    if isinstance(vec, dict):
        return dict(vec)
    if hasattr(vec, "delta"):
        return dict(vec.delta)
    from lobes.adaltm.task_vector import load_task_vector

    return dict(load_task_vector(vec).delta)


def _check_vector(name, delta, base_state, source=None):
    missing = sorted(set(base_state) - set(delta))
    extra = sorted(set(delta) - set(base_state))
    shapes = [f"{k}: vector {tuple(delta[k].shape)} vs base {tuple(base_state[k].shape)}"
              for k in sorted(set(delta) & set(base_state)) if delta[k].shape != base_state[k].shape]
    if missing or extra or shapes:
        def head(items):
            return ", ".join(items[:20]) + (f" ... (+{len(items) - 20} more)" if len(items) > 20 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if extra:
            parts.append(f"unexpected keys: {head(extra)}")
        if shapes:
            parts.append(f"shape mismatches: {head(shapes)}")
        where = f" ({source})" if isinstance(source, (str, bytes, os.PathLike)) else ""  # name the file too
        raise DataError(f"task vector '{name}'{where} does not fit the base model ({'; '.join(parts)})")


class MergeStrategy:
    """How a :class:`MergedWavLM` runs eq. (4), chosen once from ``merge_impl``.

    ``setup`` makes the strategy's extra state, ``sync`` brings stored weights up to date with λ, ``merged_weight``
    gives one merged parameter differentiable in λ, ``call`` runs one merge group; ``stacks_deltas`` /
    ``keeps_base_copy`` state its memory needs. A strategy holds no state itself: everything lives in the model it
    is given, so the model moves between devices, is copied and checkpointed as one module.
    """

    name = None
    stacks_deltas = False    # load each key's K ΔW as rows of one [K, ...] tensor (one GEMV per merge)
    keeps_factors = False    # keep truncated matrices as U, V factors (never as a dense ΔW)
    keeps_base_copy = False  # keep W_base beside the stored weights (one more copy of the model)

    def setup(self, model):
        """Extra state the strategy needs, made once after the task vectors are loaded."""

    def sync(self, model, force=False):
        """Bring the stored weights up to date with λ (only a strategy that stores the merge has work here)."""

    def merged_weight(self, model, key, lam):
        """W_base + Σ_k λ_k^(g) ΔW_k of one parameter as a plain autograd expression of λ."""
        base = model.base_parameter(key)
        g = model.group_of[key]
        w = base
        for k, store in enumerate(model.deltas):
            w = w + lam[k, g] * store[key.replace(".", "__")].to(base.dtype)
        return w

    def call(self, model, group, args, kwargs):
        """Run one wrapped merge group (a :class:`_MergedGroup`) with its merged weights."""
        raise NotImplementedError


class FunctionalMerge(MergeStrategy):
    """Plain autograd through W_base + Σ_k λ_k ΔW_k (``functional_call``): the reference the others are tested
    against. Memory needs: W_base + K separate ΔW; the merged weights stay saved by autograd until backward."""

    name = "functional"

    def call(self, model, group, args, kwargs):
        return functional_call(group.inner, model.merged_parameters(group.prefix), args, kwargs)


class FusedMerge(MergeStrategy):
    """One merge node per group whose backward reduces dL/dW into λ and rebuilds W_merged instead of saving it
    (:func:`lobes.adaltm.merged_linear.fused_call`). Memory needs: W_base + the K ΔW stacked as one [K, ...] tensor
    per key; no merged weight outlives its group's forward. RESULTS.md rows ``fused_bf16`` / ``fused_gc_bf16`` /
    ``fused_bf16_cnngc``: the lowest peak memory of any λ-training variant."""

    name = "fused"
    stacks_deltas = True

    def call(self, model, group, args, kwargs):
        sources, lam = model._group_sources(group)
        # with checkpointing the whole group is recomputed in backward anyway (its own saved-tensor hooks)
        return merged_linear.fused_call(group.inner, sources, lam, args, kwargs,
                                        rebuild_in_backward=not model.checkpointed(group.prefix))


class MaterializedMerge(MergeStrategy):
    """The stored weights *are* W_base + Σ_k λ_k ΔW_k for the current λ, re-merged from a kept copy of W_base when
    λ has moved (once per optimizer step, or after a checkpoint load); the forward builds nothing and the backward
    reduces each dL/dW into λ as autograd produces it. Memory needs: W_base + W + the stacked ΔW (one more copy of
    the weights than fused). RESULTS.md row ``materialized``: the fastest λ step (1.01× of full fine-tuning)."""

    name = "materialized"
    stacks_deltas = True
    keeps_base_copy = True

    def setup(self, model):
        # frozen Parameters, like ΔW (DDP broadcasts them once, not every step as it would buffers); no merge
        # here: the first forward (or merged_weight) merges, on the device the model then lives on
        model.base_weights = torch.nn.ParameterDict({
            k.replace(".", "__"): torch.nn.Parameter(model.base_parameter(k).detach().clone(), requires_grad=False)
            for k in model.keys})

    def sync(self, model, force=False):
        """Make the stored weights W_base + Σ_k λ_k ΔW_k for the current λ.

        Decided on the host, never by reading λ back from the GPU (a ``.tolist()`` of a λ comparison per step
        would stall the CUDA stream): ``force`` (the forward of a training step with trainable λ: every step
        moves λ, so this re-merges once per step, as comparing would), or λ stale since a training forward (its
        optimizer step may be fused AdamW, which leaves the version counter alone), or λ's host-side key changed
        (checkpoint load, an in-place edit, a device move). A fixed λ is merged once. Each merge is recomputed
        from W_base (merge_into), so it is bitwise the same whatever path λ took (exact resume)."""
        if not (force or model._merge_stale or model._lambda_key() != model._merged_key):
            return
        with torch.no_grad():
            lam = model.lambdas().detach()  # [K, G] on λ's device: each group's column stays a device tensor
            for key in model.keys:
                name = key.replace(".", "__")
                merged_linear.merge_into(model.base_parameter(key), model.base_weights[name],
                                         [s[name] for s in model.deltas], lam[:, model.group_of[key]])
        model._merged_key = model._lambda_key()
        # a training forward is followed by an optimizer step that moves λ: the next non-forced call re-merges
        model._merge_stale = bool(force)

    def merged_weight(self, model, key, lam):
        # the stored W holds the current λ's merge; attach its λ gradient
        self.sync(model)  # a no-op (host-side check) unless λ moved since the last sync
        return merged_linear.MaterializedWeight.apply(
            lam[:, model.group_of[key]], model.base_parameter(key),
            *[s[key.replace(".", "__")] for s in model.deltas])

    def call(self, model, group, args, kwargs):
        sources, lam = model._group_sources(group)
        return merged_linear.materialized_call(group.inner, sources, lam, args, kwargs)


class LowRankMerge(MergeStrategy):
    """Truncated task vectors as factors: W_base + Σ_k λ_k U_k V_kᵀ. Linear and CNN conv layers run
    :class:`lobes.adaltm.lowrank_linear.LowRankLinear` / ``LowRankConv1d`` (merged W built in forward, only the
    r-wide projections Vᵀx kept, dL/dλ = Σ_t (U_kᵀ δ_t)·(V_kᵀ x_t), no dW GEMM); biases, norms, the weight-normed
    positional conv and the relative-position embedding are merged by plain autograd (their ΔW dense, or expanded
    from factors). Memory needs: W_base + the factors; no merged weight outlives its layer's call."""

    name = "lowrank"
    keeps_factors = True

    def setup(self, model):
        lowrank_linear.setup_factors(model)

    def merged_weight(self, model, key, lam):
        if key in model.lowrank_ranks:
            return lowrank_linear.merged_factored(model, key, lam)
        return super().merged_weight(model, key, lam)

    def call(self, model, group, args, kwargs):
        return lowrank_linear.lowrank_call(model, group, args, kwargs)


# The one place the YAML string ``merge_impl`` is read.
MERGE_STRATEGIES = {s.name: s for s in (MaterializedMerge, FusedMerge, FunctionalMerge, LowRankMerge)}
MERGE_IMPLS = tuple(MERGE_STRATEGIES)


class _MergedGroup(torch.nn.Module):
    """Runs one merge group's submodule with its merged weights (built on every call)."""

    def __init__(self, inner, prefix, owner):
        super().__init__()
        self.inner = inner
        self.prefix = prefix
        self._owner = weakref.ref(owner)  # a plain reference would make the owner its own submodule

    def _call(self, *args, **kwargs):
        owner = self._owner()
        return owner.strategy.call(owner, self, args, kwargs)

    def forward(self, *args, **kwargs):
        owner = self._owner()
        if owner.checkpointed(self.prefix) and torch.is_grad_enabled() and owner.num_vectors:
            return checkpoint(self._call, *args, use_reentrant=False, **kwargs)
        return self._call(*args, **kwargs)


class MergedWavLM(WavLMShape, torch.nn.Module):
    """Frozen base + frozen task vectors + learnable λ (see module docstring).

    Arguments
    ---------
    source : str
        HF hub id or local directory of the base WavLM (W_base).
    task_vectors : dict or None
        Ordered ``{name: path | TaskVector | dict}`` of task vectors ΔW; ``{}`` or None gives Setup 1 (frozen
        base, no merge).
    lambda_mode : str
        How λ is learnt: ``"fixed"``, ``"global"`` or ``"layerwise"`` (AdaLTM: one λ per task vector per
        group); see :class:`lobes.adaltm.merge_coefficients.MergeCoefficients`.
    lambda_init : float
        Initial λ of every task vector and group (0.5 in the paper).
    normalize_wav : bool
        Zero-mean, unit-variance each utterance over its valid samples (WavLM-Large's input normalisation).
    delta_dtype : torch.dtype or None
        Store ΔW in this dtype (e.g. ``torch.bfloat16``) to save memory; merging is done in fp32.
    gradient_checkpointing : bool or str
        ``True`` recomputes every group in backward; ``"cnn"`` only the CNN feature
        extractor, whose activations are the largest per FLOP (42% of a step's saved activations for 4 s of audio).
    cache_dir : str or None
        transformers cache directory for hub downloads.
    merge_impl : str
        ``"materialized"``, ``"fused"``, ``"functional"`` or ``"lowrank"``: which :class:`MergeStrategy` runs
        eq. (4) (same outputs and λ gradients; see the module docstring and benchmarks/RESULTS.md).
    delta_rank : int, float or None
        Truncate each task-vector matrix to this rank, or to this fraction of its energy (``lobes.adaltm.low_rank``;
        cached beside a vector file); None keeps ΔW exact (the paper). ``lowrank`` needs it.
    """

    def __init__(self, source, task_vectors=None, lambda_mode="layerwise", lambda_init=0.5, normalize_wav=True,
                 delta_dtype=None, gradient_checkpointing=False, cache_dir=None, merge_impl="materialized",
                 delta_rank=None):
        super().__init__()
        if merge_impl not in MERGE_STRATEGIES:
            raise ValueError(f"merge_impl '{merge_impl}' is not one of {MERGE_IMPLS}")
        self.merge_impl = merge_impl  # the setting, as reported; behaviour comes from self.strategy
        strategy = MERGE_STRATEGIES[merge_impl]()
        self.model = load_wavlm(source, cache_dir=cache_dir)
        self.model.requires_grad_(False)
        self.source = str(source)
        self.normalize_wav = normalize_wav
        if gradient_checkpointing not in (True, False, "cnn"):
            raise ValueError(f"gradient_checkpointing {gradient_checkpointing!r} is not True, False or 'cnn'")
        self.gradient_checkpointing = gradient_checkpointing
        cfg = self.model.config
        self.stable_layer_norm = bool(cfg.do_stable_layer_norm)
        base_state = {k: v for k, v in self.model.state_dict().items()}
        self.keys = list(base_state)
        self.group_of = {k: layer_groups.group_of(k, cfg.num_hidden_layers, self.stable_layer_norm)
                         for k in self.keys}

        task_vectors = dict(task_vectors or {})
        self.lambdas = MergeCoefficients(list(task_vectors), self.num_groups, lambda_mode, lambda_init)
        self.delta_rank = low_rank.check_rank_spec(delta_rank)
        if strategy.keeps_factors and self.delta_rank is None:
            raise DataError(f"merge_impl '{merge_impl}' needs delta_rank (an integer rank or an energy fraction)")
        self._load_vectors(task_vectors, base_state, strategy, delta_dtype)
        for path, _ in layer_groups.group_modules(cfg.num_hidden_layers, self.stable_layer_norm):
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            parent._modules[attr] = _MergedGroup(parent._modules[attr], path, self)
        self._base = {k: self._find_base(k) for k in self.keys}
        self.model.eval()
        # materialized: which λ the stored weights hold, as host-side facts only (see sync_merged)
        self._merged_key = None   # None: the stored weights are W_base, no merge applied yet
        self._merge_stale = False
        # without task vectors there is nothing to merge: every strategy is the plain model
        self.strategy = strategy if self.num_vectors else FunctionalMerge()
        self.strategy.setup(self)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _load_vectors(self, task_vectors, base_state, strategy, delta_dtype):
        """Each vector's ΔW as frozen Parameters in ``self.deltas`` (lowrank: the factors in ``_factor_lists``)."""
        # ΔW are frozen Parameters (not buffers): DDP broadcasts buffers every step, parameters only once.
        # fused / materialized: each key's K task vectors are copied straight into the rows of one [K, ...]
        # tensor (one GEMV per merge, see merged_linear.stacked_view), one loaded vector at a time, so no
        # second copy of all ΔW is ever alive.
        num_vectors, stacked = len(task_vectors), {}
        self.deltas = torch.nn.ModuleList()
        self._factor_lists = {}  # lowrank: {key: [(U_k, V_k)]}, concatenated by LowRankMerge.setup
        for row, (name, vec) in enumerate(task_vectors.items()):
            if self.delta_rank is None:
                delta = _resolve_vector(name, vec)
                _check_vector(name, delta, base_state, vec)
            else:
                delta = low_rank.merge_inputs(name, vec, self.delta_rank, strategy.keeps_factors, self._factor_lists,
                                              delta_dtype, lambda d, n=name, v=vec: _check_vector(n, d, base_state, v))
            store = {}
            for k in (k for k in self.keys if k in delta):  # lowrank: factored keys are not in delta
                value = delta[k].detach().to(delta_dtype or base_state[k].dtype)
                if strategy.stacks_deltas and num_vectors > 1:
                    if k not in stacked:
                        stacked[k] = torch.empty((num_vectors, *value.shape), dtype=value.dtype,
                                                 device=value.device)
                    stacked[k][row].copy_(value)
                    value = stacked[k][row]
                store[k.replace(".", "__")] = torch.nn.Parameter(value, requires_grad=False)
            self.deltas.append(torch.nn.ParameterDict(store))
            del delta, store
        del stacked
        _release_freed_memory()

    def _find_base(self, key):
        for path, _ in layer_groups.group_modules(self.num_layers, self.stable_layer_norm):
            if key.startswith(path + "."):
                local = key[len(path) + 1:]
                return path, local
        return None, key

    @property
    def num_groups(self):
        return layer_groups.num_groups(self.model.config.num_hidden_layers)

    @property
    def num_vectors(self):
        return len(self.deltas)

    def checkpointed(self, prefix):
        """Whether the wrapped group at ``prefix`` is recomputed in backward (``gradient_checkpointing``)."""
        if self.gradient_checkpointing == "cnn":
            return prefix == "feature_extractor"
        return bool(self.gradient_checkpointing)

    def _lambda_key(self):
        """Host-side identity of λ's current value: device, storage, in-place version counter (bumped by the
        foreach / single-tensor optimizers and ``copy_``) and the checkpoint-load revision. No GPU read."""
        lam = self.lambdas.lam
        return lam.device, lam.untyped_storage()._cdata, lam._version, self.lambdas.revision

    def sync_merged(self, force=False):
        """Bring the stored weights up to date with λ (merge_impl="materialized"; see MaterializedMerge.sync)."""
        self.strategy.sync(self, force)

    def base_parameter(self, key):
        """The stored tensor of ``key``: W_base, or with merge_impl="materialized" the merged W (sync_merged)."""
        path, local = self._base[key]
        module = self.model.get_submodule(path).inner if path else self.model
        return module.get_parameter(local)

    def train(self, mode=True):
        super().train(mode)
        self.model.eval()  # frozen feature extractor: never dropout
        return self

    # -- eq. (4) -------------------------------------------------------------------------------------
    def merged_weight(self, key, lam=None):
        """W_base + Σ_k λ_k^(g) ΔW_k for one parameter (g = its group)."""
        if not self.num_vectors:
            return self.base_parameter(key)
        return self.strategy.merged_weight(self, key, self.lambdas() if lam is None else lam)

    def merged_parameters(self, prefix):
        """Merged weights of one wrapped submodule, keyed by their names inside it."""
        if not self.num_vectors:
            return {}
        lam = self.lambdas()
        n = len(prefix) + 1
        return {k[n:]: self.merged_weight(k, lam) for k in self.keys if k.startswith(prefix + ".")}

    def _group_sources(self, group):
        """{name inside the wrapped module: (stored W, [ΔW_k])} and that group's λ column [K]."""
        n = len(group.prefix) + 1
        keys = [k for k in self.keys if k.startswith(group.prefix + ".")]
        sources = {k[n:]: (self.base_parameter(k), [s[k.replace(".", "__")] for s in self.deltas]) for k in keys}
        return sources, self.lambdas()[:, self.group_of[keys[0]]]  # every key of a wrapped module is in one group

    def merged_state_dict(self):
        """Every backbone weight merged with the current λ (detached): the folded model of eq. (4)."""
        with torch.no_grad():
            lam = self.lambdas()
            return {k: self.merged_weight(k, lam).detach().clone() for k in self.keys}

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, wavs, wav_lens):
        """Hidden states [L+1, B, T, D] and frame mask [B, T] of the merged model."""
        trains = self.num_vectors and self.lambdas.lam.requires_grad and torch.is_grad_enabled()
        self.sync_merged(force=bool(trains))  # materialized: λ moved since the last call (optimizer step, ...)
        if not self.num_vectors or not self.lambdas.lam.requires_grad:
            with torch.no_grad():  # nothing upstream of the features is trainable
                return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)
        return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)

    def coefficients(self):
        """{vector name: [λ per group]} (group 0 = CNN + positional embedding)."""
        return self.lambdas.as_dict()


def apply_static_merge(model, task_vectors, lam=0.5):
    """In place: W <- W + λ Σ_k ΔW_k on a plain WavLMModel (eq. 4 with one fixed λ; the MTL 'static init')."""
    state = model.state_dict()
    with torch.no_grad():
        for name, vec in (task_vectors or {}).items():
            delta = _resolve_vector(name, vec)
            _check_vector(name, delta, state, vec)
            for k, d in delta.items():
                state[k].add_(lam * d.to(state[k].dtype))
    return model
