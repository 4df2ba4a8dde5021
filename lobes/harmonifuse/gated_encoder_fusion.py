"""HarmoniFuse gated speech encoder: task-specific, sample-shared fusion of the WavLM layers.

The paper describes it as a learnable softmax-weighted sum over all encoder layers per task followed by a
task-specific gate that selects components; it gives no equation for the gate. The form implemented here:

    α^τ     = softmax(w^τ)                                 w^τ ∈ R^L, init 0 -> uniform (s3prl featurizer)
    H̄^τ     = Σ_l α^τ_l · norm(H_l)                        norm = optional per-layer LayerNorm without affine
    g^τ     = 2 · sigmoid(γ^τ)                             γ^τ ∈ R^D, init 0 -> g^τ = 1 exactly
    H^τ     = g^τ ⊙ H̄^τ                                    (channel gate, broadcast over batch and time)

Why this gate:
* "task-specific, sample-shared": the encoder fusion must not depend on the input (that is the job of the
  prompt-adaptive fusion in the LM, :mod:`lobes.harmonifuse.dynamic_fusion`), so the gate is a per-task parameter
  vector, not a function of the hidden states.
* Component selection = per-channel scaling in (0, 2): a channel can be switched off (g -> 0), kept (g = 1)
  or emphasised (g -> 2). Scaling sigmoid by 2 makes the initial gate exactly the identity, so the model
  starts as the plain s3prl weighted sum (adding the gate perturbs nothing at step 0), and the gate's
  gradient is largest at init (d g / d γ = 0.5) instead of the vanishing 0.05 of sigmoid(+3) ≈ 0.95.
* ``gate="none"`` is the ablation "weighted sum only".

Layer indexing: WavLM's HF hidden states hold L+1 entries, index 0 = CNN (+ positional conv) output. By
default (``include_cnn=False``) fusion runs over the L transformer layers 1..L, so ``layer_weights(task)[i]``
is the weight of transformer layer i+1; with ``include_cnn=True`` entry 0 is the CNN output.
"""
import torch
import torch.nn.functional as F

from lobes.errors import DataError


def stack_hidden_states(hidden_states):
    """Tuple/list of [B, T, D] or a tensor [N, B, T, D] -> tensor [N, B, T, D]."""
    if isinstance(hidden_states, (list, tuple)):
        return torch.stack(list(hidden_states), dim=0)
    if hidden_states.dim() != 4:
        raise DataError(f"hidden states must be [layers, B, T, D], got shape {tuple(hidden_states.shape)}")
    return hidden_states


def task_indices(task, tasks, batch_size, device):
    """Task name / index for the whole batch, or a per-sample list/tensor of names or indices -> LongTensor [B]."""
    def one(t):
        if isinstance(t, str):
            if t not in tasks:
                raise DataError(f"unknown task '{t}'; this model knows {list(tasks)}")
            return tasks.index(t)
        t = int(t)
        if not 0 <= t < len(tasks):
            raise DataError(f"task index {t} out of range for tasks {list(tasks)}")
        return t

    if isinstance(task, torch.Tensor) and task.dim() == 1:
        idx = torch.tensor([one(t) for t in task.tolist()], dtype=torch.long)
    elif isinstance(task, (list, tuple)):
        idx = torch.tensor([one(t) for t in task], dtype=torch.long)
    else:
        idx = torch.full((batch_size,), one(task.item() if isinstance(task, torch.Tensor) else task),
                         dtype=torch.long)
    if idx.numel() != batch_size:
        raise DataError(f"got {idx.numel()} task ids for a batch of {batch_size}")
    return idx.to(device)


class GatedEncoderFusion(torch.nn.Module):
    """Per-task softmax layer weights + per-task channel gate over encoder hidden states (see module doc).

    Arguments
    ---------
    num_layers : int       transformer layers L of the encoder (WavLM-Large: 24).
    hidden_size : int      D.
    tasks : tuple of str   task names; ``forward`` accepts a name, an index, or one per sample.
    gate : "channel" | "none"
    include_cnn : bool     also weight the CNN output (hidden state 0).
    layer_norm : bool      s3prl's optional per-layer normalisation before the weighted sum.
    """

    def __init__(self, num_layers, hidden_size, tasks=("asr", "ser"), gate="channel", include_cnn=False,
                 layer_norm=False):
        super().__init__()
        if gate not in ("channel", "none"):
            raise DataError(f"gate must be 'channel' or 'none', got '{gate}'")
        self.tasks = tuple(tasks)
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.include_cnn = include_cnn
        self.layer_norm = layer_norm
        self.gate = gate
        n = self.num_layers + (1 if include_cnn else 0)
        self.layer_logits = torch.nn.Parameter(torch.zeros(len(self.tasks), n))  # w^τ
        if gate == "channel":
            self.gate_logits = torch.nn.Parameter(torch.zeros(len(self.tasks), self.hidden_size))  # γ^τ
        else:
            self.register_parameter("gate_logits", None)

    def _select(self, hs):
        """Keep the entries that are fused: [L+1 or L, B, T, D] -> [n, B, T, D]."""
        n_in = hs.shape[0]
        if n_in == self.num_layers + 1:
            return hs if self.include_cnn else hs[1:]
        if n_in == self.num_layers and not self.include_cnn:
            return hs
        raise DataError(
            f"encoder gave {n_in} hidden states but the fusion was built for {self.num_layers} layers"
            f"{' + CNN output' if self.include_cnn else ''}; check num_layers against the encoder config")

    def weights(self, task_idx):
        """[B] task indices -> [B, n] layer weights α."""
        return F.softmax(self.layer_logits, dim=-1)[task_idx]

    def gates(self, task_idx):
        """[B] task indices -> [B, D] channel gates g (ones when gate='none')."""
        if self.gate_logits is None:
            return torch.ones(task_idx.numel(), self.hidden_size, device=task_idx.device)
        return 2.0 * torch.sigmoid(self.gate_logits)[task_idx]

    def forward(self, hidden_states, task):
        hs = self._select(stack_hidden_states(hidden_states))
        if hs.shape[-1] != self.hidden_size:
            raise DataError(f"hidden size {hs.shape[-1]} != fusion hidden_size {self.hidden_size}")
        if self.layer_norm:
            hs = F.layer_norm(hs, (hs.shape[-1],))
        idx = task_indices(task, self.tasks, hs.shape[1], hs.device)
        alpha = self.weights(idx).to(hs.dtype)                       # [B, n]
        fused = torch.einsum("nbtd,bn->btd", hs, alpha)
        return fused * self.gates(idx).to(hs.dtype)[:, None, :]

    def layer_weights(self, task):
        """The softmax distribution α^τ over fused layers (detached, for plots)."""
        idx = task_indices(task, self.tasks, 1, self.layer_logits.device)
        return self.weights(idx)[0].detach().clone()

    def gate_values(self, task):
        """The channel gate g^τ ∈ (0, 2)^D (detached)."""
        idx = task_indices(task, self.tasks, 1, self.layer_logits.device)
        return self.gates(idx)[0].detach().clone()
