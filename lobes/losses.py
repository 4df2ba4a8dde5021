"""Class-balanced soft cross-entropy (AdaLTM §3.3; Cui et al. 2019, Chou et al. 2023).

    L = (1/B) Σ_i Σ_c  w_c · y_ic · (−log softmax(z_i)_c)

y_i is the soft label (distribution of annotator votes over the recipe's classes, sums to 1). Class weights follow
the effective number of samples: E_c = (1 − β^{n_c}) / (1 − β), w_c ∝ 1 / E_c, rescaled so Σ_c w_c = C.
β → 1 gives inverse-frequency weights; β = 0 gives uniform weights. n_c are training-set counts of the hard
labels (a class with n_c = 0 gets weight 0, since it cannot be learnt anyway).
"""
import torch
import torch.nn.functional as F


def effective_number_weights(counts, beta=0.9999):
    """w_c ∝ (1 − β) / (1 − β^{n_c}), normalised to sum to the number of classes present."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    w = torch.zeros_like(counts)
    if beta >= 1.0:
        w[present] = 1.0 / counts[present]
    else:
        w[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts[present]))
    w = w * present.sum() / w.sum()
    return w.float()


def soft_cross_entropy(logits, soft_targets, class_weights=None):
    """Mean over the batch of Σ_c w_c y_c (−log p_c); plain soft CE when ``class_weights`` is None."""
    logp = F.log_softmax(logits.float(), dim=-1)
    per_class = -soft_targets.float() * logp
    if class_weights is not None:
        per_class = per_class * class_weights.to(per_class.device)[None, :]
    return per_class.sum(-1).mean()


class ClassBalancedSoftCE(torch.nn.Module):
    """Holds the class weights (a buffer, so they follow the module's device and get checkpointed).

    Arguments
    ---------
    num_classes : int
        Number of classes C; the weights are uniform (all 1) until counts are given.
    beta : float
        β of the effective number of samples, E_c = (1 − β^{n_c}) / (1 − β); β → 1 gives inverse frequency.
    counts : sequence of int or None
        Training-set counts n_c of the hard labels per class (or call ``set_counts`` later); None: uniform.
    """

    def __init__(self, num_classes=8, beta=0.9999, counts=None):
        super().__init__()
        self.beta = beta
        w = torch.ones(num_classes) if counts is None else effective_number_weights(counts, beta)
        self.register_buffer("class_weights", w)

    def set_counts(self, counts):
        self.class_weights.copy_(effective_number_weights(counts, self.beta))

    def forward(self, logits, soft_targets):
        return soft_cross_entropy(logits, soft_targets, self.class_weights)
