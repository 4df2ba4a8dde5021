"""Emotion prediction head: frame projection, masked pooling over time, MLP classifier.

Pooling ignores padded frames (mask from the encoder), so a batch's padding never changes an utterance's
prediction. ``pooling``: ``mean`` or ``mean_std`` (statistics pooling).

``head_type``:
- ``frame_mlp`` (default; the paper-faithful rows): Linear -> ReLU -> Dropout per frame, then pooling.
- ``pooled_linear``: a purely linear frame projection, then masked mean pooling, then ReLU -> Dropout. Its
  pooled output is W·mean_t(Σ_l α_l h_lt) + b = W·Σ_l α_l mean_t(h_lt) + b, so it can train from a per-layer
  *pooled* feature cache ([L+1, D] per utterance, lobes.adaltm.feature_cache) and give the same logits as the
  frame-level forward. Same parameter names as ``frame_mlp`` with one projection layer.
"""
import torch

HEAD_TYPES = ("frame_mlp", "pooled_linear")


def masked_mean_std(x, mask):
    """Mean and std over valid frames. x: [B, T, D], mask: [B, T] bool."""
    m = mask.unsqueeze(-1).to(x.dtype)
    n = m.sum(1).clamp(min=1.0)
    mean = (x * m).sum(1) / n
    var = (((x - mean.unsqueeze(1)) * m) ** 2).sum(1) / n
    return mean, torch.sqrt(var + 1e-6)


class SERHead(torch.nn.Module):
    """Emotion head: frame projection, masked pooling over time, MLP classifier (see module doc).

    Arguments
    ---------
    input_size : int
        Width D of the encoder features [B, T, D].
    hidden_size : int
        Width of the frame projection and of the classifier's hidden layer.
    num_classes : int
        Number of emotion classes (logits per utterance).
    pooling : str
        ``"mean"`` (masked mean over time) or ``"mean_std"`` (statistics pooling: mean and std).
    dropout : float
        Dropout probability after each ReLU.
    num_proj_layers : int
        Number of frame projection layers before pooling.
    head_type : str
        ``"frame_mlp"`` (nonlinearity per frame, the paper's head) or ``"pooled_linear"`` (linear projection,
        nonlinearity after pooling, so it can train from a pooled feature cache).
    """

    def __init__(self, input_size, hidden_size=256, num_classes=8, pooling="mean", dropout=0.1, num_proj_layers=1,
                 head_type="frame_mlp"):
        super().__init__()
        if pooling not in ("mean", "mean_std"):
            raise ValueError(f"pooling '{pooling}' is not 'mean' or 'mean_std'")
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type '{head_type}' is not one of {HEAD_TYPES}")
        if head_type == "pooled_linear" and (pooling != "mean" or num_proj_layers != 1):
            # the std of a projection does not commute with the layer sum; a 2nd layer would need a nonlinearity
            raise ValueError("head_type 'pooled_linear' needs pooling 'mean' and num_proj_layers 1, got "
                             f"pooling '{pooling}', num_proj_layers {num_proj_layers}")
        self.pooling, self.head_type = pooling, head_type
        # the constructor arguments, so an export can state the head it holds (lobes.adaltm.fold_export)
        self.config = {"input_size": input_size, "hidden_size": hidden_size, "num_classes": num_classes,
                       "pooling": pooling, "dropout": dropout, "num_proj_layers": num_proj_layers,
                       "head_type": head_type}
        layers, size = [], input_size
        for _ in range(num_proj_layers):
            layers.append(torch.nn.Linear(size, hidden_size))
            if head_type == "frame_mlp":
                layers += [torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            size = hidden_size
        self.frame_proj = torch.nn.Sequential(*layers)
        # pooled_linear: the nonlinearity comes after pooling (parameter-free, so state dicts match frame_mlp)
        self.post_pool = (torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(dropout))
                          if head_type == "pooled_linear" else torch.nn.Identity())
        pooled = hidden_size * (2 if pooling == "mean_std" else 1)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(pooled, hidden_size), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden_size, num_classes))

    @property
    def poolable(self):
        """True when the head's output depends on the frames only through their per-layer means."""
        return self.head_type == "pooled_linear"

    def pool(self, feats, mask):
        mean, std = masked_mean_std(self.frame_proj(feats), mask)
        return self.post_pool(mean if self.pooling == "mean" else torch.cat([mean, std], dim=-1))

    def forward(self, feats, mask):
        """feats [B, T, D], mask [B, T] -> logits [B, num_classes]."""
        return self.classifier(self.pool(feats, mask))
