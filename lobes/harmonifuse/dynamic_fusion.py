"""HarmoniFuse prompt-adaptive dynamic fusion over the layers of the speech language model.

The paper: "per-layer importance weights are computed as a sum of a task- and layer-specific learnable
scalar and an input-dependent score from a small FFN on the hidden state". The precise form used here, written
as a residual around the last layer (the one the LM head was trained on):

    p_l(x)     = LN( Σ_t m_t h_{l,t} / Σ_t m_t )           mask-aware mean pool of layer l, LN without affine
    w_{τ,l}(x) = b_{τ,l} + f(p_l(x)),  l = 1..L-1           f = Linear(D, H) - Tanh - Linear(H, 1), shared
    fused_t    = h_{L,t} + Σ_{l<L} w_{τ,l}(x) (h_{l,t} − h_{L,t})
               = Σ_l β_{τ,l}(x) h_{l,t},   β_l = w_l (l < L),  β_L = 1 − Σ_{l<L} w_l

* Identity at init: b = 0 and the output layer of f is zero, so w = 0, β = one-hot on the last layer, and the
  model is exactly the pretrained LM (β_L = 1, the other terms are exact zeros). The earlier form,
  softmax_l(b + f), started as an even average of all layers, which the LM head was never trained on (on the
  pretrained tiny LM: text loss 1.57 -> 2.23 nats/token at step 0). A softmax cannot be one-hot exactly, and
  a large initial logit on the last layer saturates it (the gradient of b_l is α_l ⟨g, h_l − fused⟩ ≈ 0).
  Here the gradient of b_l at init is ⟨g, h_l − h_L⟩: each layer is as easy to move to as any other.
* ``form="residual"`` (the default): β is an affine combination (Σ β_l = 1 exactly), not a distribution: a
  weight may leave [0, 1] (extrapolate away from a layer). The weights reported and plotted are β.
* Task (prompt) conditioning comes from two places: the static term b_τ, and the hidden states themselves,
  which are computed from a sequence that starts with the task's prompt tokens. In
  :class:`lobes.harmonifuse.speech_lm.SpeechLM` the pool mask m covers only the prompt + speech positions (the
  condition), never the target tokens: pooling over targets would let a causal LM see future tokens through
  β, and generation could not reproduce it. So β is fixed once the prefix is read.
* LayerNorm on the pooled vector makes f see a scale-free summary: residual-stream norms grow with depth and
  f would otherwise mostly learn "deeper = larger".
* ``form="simplex"`` (the recipe's ``lm_fusion_form``) bounds β to the probability simplex and keeps the rest
  (the same w, the same identity at init, the same gradient at init):

      c_l = [w_{τ,l}(x)]_+,  l = 1..L-1                 a nonnegative mass per lower layer
      β_l = c_l / (1 + Σ_{k<L} c_k),  β_L = 1 / (1 + Σ_{k<L} c_k)     the last layer has the fixed mass 1

  β ≥ 0 and Σ β = 1 for any w, so the fused state is a convex mix of the normalised layers (no extrapolation
  h_L + k (h_L − h_l), which the residual form learned on the mini runs and which acts like a sharper LM-head
  temperature rather than a choice of layers). At init c = 0: β = e_L exactly (0/1 and 1/1 are exact), and
  ∂β_l/∂w_l = 1, ∂β_L/∂w_l = −1, so the coefficient of layer l gets ⟨g, h_l − h_L⟩ as in the residual form.
  Why not a gate s ∈ [0, 1] on a softmax, β = (1 − s) e_L + s softmax(z): at s = 0 its ∂β/∂z = s J = 0, so the
  layer logits get no gradient at init (and the softmax's first direction is the even average). [w]_+ is a
  clamp whose gradient passes where w ≥ 0 (the init, as torch's clamp) and, below 0, only when it would raise w
  (:func:`clamp_inward`): with a plain clamp a coefficient pushed below 0 once (the residual runs pushed every
  lower layer below 0) never gets a gradient again and that layer is dropped for the rest of training.
* ``mode="static"`` drops f (ablation: static fusion only); ``mode="last"`` returns the last layer
  (no fusion, weights one-hot on the last layer) and has no parameters (DDP needs no
  ``find_unused_parameters`` for it).
"""
import torch
import torch.nn.functional as F

from lobes.errors import DataError
from lobes.harmonifuse.gated_encoder_fusion import stack_hidden_states, task_indices

MODES = ("dynamic", "static", "last")
FORMS = ("residual", "simplex")


def masked_mean(hs, mask):
    """Mean over time of [N, B, T, D] with a [B, T] bool mask (None = all frames) -> [N, B, D]."""
    if mask is None:
        return hs.mean(dim=2)
    m = mask.to(hs.dtype)[None, :, :, None]
    return (hs * m).sum(dim=2) / m.sum(dim=2).clamp(min=1.0)


def residual_weights(w):
    """Residual coefficients w [B, L-1] of layers 1..L-1 -> layer weights β [B, L] (β_L = 1 − Σ w)."""
    return torch.cat([w, 1.0 - w.sum(dim=-1, keepdim=True)], dim=-1)


class _ClampInward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        # descent moves w by −grad: below 0, pass only a gradient that moves w back up (grad < 0)
        return grad * ((w >= 0) | (grad < 0)).to(grad.dtype)


def clamp_inward(w):
    """[w]_+ whose gradient passes for w ≥ 0 and, for w < 0, only when it is negative (it would raise w)."""
    return _ClampInward.apply(w)


def simplex_weights(w):
    """Coefficients w [B, L-1] -> β [B, L] in the simplex: ([w]_+, 1) / (1 + Σ [w]_+) (``form="simplex"``)."""
    c = clamp_inward(w)
    z = 1.0 + c.sum(dim=-1, keepdim=True)
    return torch.cat([c, torch.ones_like(z)], dim=-1) / z


class PromptAdaptiveFusion(torch.nn.Module):
    """Task- and input-dependent weighting of L hidden states around the last one (see module doc); ``form``:
    residual (β affine, unbounded) or simplex (β ≥ 0, Σ β = 1).

    ``forward(hidden_states, task, pool_mask=None) -> (fused [B, T, D], weights β [B, L])``;
    ``hidden_states``: [L, B, T, D] tensor or a list of L tensors [B, T, D].
    """

    def __init__(self, num_layers, hidden_size, tasks=("asr", "ser"), ffn_hidden=64, mode="dynamic",
                 normalize_pooled=True, form="residual"):
        super().__init__()
        if mode not in MODES:
            raise DataError(f"fusion mode must be one of {MODES}, got '{mode}'")
        if form not in FORMS:
            raise DataError(f"lm_fusion_form must be one of {FORMS}, got '{form}'")
        self.form = form
        self.tasks = tuple(tasks)
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.mode = mode
        self.normalize_pooled = normalize_pooled
        if mode == "last":  # no parameter at all: one that never gets a gradient would break DDP
            self.register_parameter("layer_bias", None)
        else:  # b_{τ,l} of layers 1..L-1: the last layer's weight is 1 − Σ (it needs no parameter of its own)
            self.layer_bias = torch.nn.Parameter(torch.zeros(len(self.tasks), self.num_layers - 1))
        if mode == "dynamic":
            self.ffn = torch.nn.Sequential(
                torch.nn.Linear(self.hidden_size, ffn_hidden), torch.nn.Tanh(),
                torch.nn.Linear(ffn_hidden, 1, bias=False))
            torch.nn.init.zeros_(self.ffn[2].weight)  # w = b = 0 at init: the plain last layer
        else:
            self.ffn = None

    def _check(self, hs):
        if hs.shape[0] != self.num_layers or hs.shape[-1] != self.hidden_size:
            raise DataError(f"fusion built for {self.num_layers} layers of size {self.hidden_size}, got hidden "
                            f"states of shape {tuple(hs.shape)}")

    def scores(self, hidden_states, task, pool_mask=None):
        """w_{τ,l}(x) of layers 1..L-1: [B, L-1] (residual coefficients)."""
        hs = stack_hidden_states(hidden_states)
        self._check(hs)
        return self.pooled_scores(masked_mean(hs, pool_mask), task)

    def pooled_scores(self, pooled, task):
        """w_{τ,l}(x) from the already pooled layers p_l(x) before LN, [L, B, D] -> [B, L-1].

        :class:`lobes.harmonifuse.speech_lm.SpeechLM` pools layer by layer, so the [L, B, T, D] stack is never built.
        """
        if self.mode == "last":
            raise DataError("lm_fusion='last' has no scores (its weights are one-hot on the last layer)")
        if pooled.shape[0] != self.num_layers or pooled.shape[-1] != self.hidden_size:
            raise DataError(f"fusion built for {self.num_layers} layers of size {self.hidden_size}, got pooled "
                            f"states of shape {tuple(pooled.shape)}")
        idx = task_indices(task, self.tasks, pooled.shape[1], pooled.device)
        s = self.layer_bias[idx]
        if self.mode == "dynamic":
            pooled = pooled[:-1]  # the last layer has no coefficient of its own
            if self.normalize_pooled:
                pooled = F.layer_norm(pooled, (pooled.shape[-1],))
            s = s + self.ffn(pooled.to(self.ffn[0].weight.dtype)).squeeze(-1).transpose(0, 1)
        return s

    def pooled_weights(self, pooled, task):
        """β(x) [B, L] from the pooled layers [L, B, D] (one-hot on the last layer for ``mode="last"``)."""
        if self.mode == "last":
            return self.last_layer_weights(pooled.shape[1], pooled.device, pooled.dtype)
        return self.weights_from_scores(self.pooled_scores(pooled, task))

    def weights_from_scores(self, w):
        """β [B, L] from the coefficients w [B, L-1] of layers 1..L-1, by ``form``."""
        return residual_weights(w) if self.form == "residual" else simplex_weights(w)

    def last_layer_weights(self, batch_size, device, dtype=torch.float32):
        """One-hot weights on the last layer, [B, L] (``mode="last"``)."""
        w = torch.zeros(batch_size, self.num_layers, device=device, dtype=dtype)
        w[:, -1] = 1.0
        return w

    def layer_weights(self, hidden_states, task, pool_mask=None):
        """β(x): [B, L], layer weights summing to 1 per sample."""
        hs = stack_hidden_states(hidden_states)
        if self.mode == "last":
            self._check(hs)
            return self.last_layer_weights(hs.shape[1], hs.device, hs.dtype)
        return self.weights_from_scores(self.scores(hs, task, pool_mask))

    @staticmethod
    def fuse(hidden_states, weights):
        """Σ_l β_l h_l for precomputed weights [B, L] (generation reuses the prefix's β)."""
        hs = stack_hidden_states(hidden_states)
        return torch.einsum("lbtd,bl->btd", hs, weights.to(hs.dtype))

    def forward(self, hidden_states, task, pool_mask=None):
        hs = stack_hidden_states(hidden_states)
        w = self.layer_weights(hs, task, pool_mask)
        if self.mode == "last":
            return hs[-1], w
        return self.fuse(hs, w), w

    def static_weights(self, task):
        """β of b_τ alone: the input-independent part (detached, for plots)."""
        if self.mode == "last":
            task_indices(task, self.tasks, 1, "cpu")
            return self.last_layer_weights(1, "cpu")[0]
        idx = task_indices(task, self.tasks, 1, self.layer_bias.device)
        return self.weights_from_scores(self.layer_bias[idx])[0].detach().clone()
