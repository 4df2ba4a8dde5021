"""Emotion prediction head: frame projection, masked pooling over time, MLP classifier.

Pooling ignores padded frames (mask from the encoder), so a batch's padding never changes an utterance's
prediction. ``pooling``: ``mean`` or ``mean_std`` (statistics pooling).
"""
import torch


def masked_mean_std(x, mask):
    """Mean and std over valid frames. x: [B, T, D], mask: [B, T] bool."""
    m = mask.unsqueeze(-1).to(x.dtype)
    n = m.sum(1).clamp(min=1.0)
    mean = (x * m).sum(1) / n
    var = (((x - mean.unsqueeze(1)) * m) ** 2).sum(1) / n
    return mean, torch.sqrt(var + 1e-6)


class SERHead(torch.nn.Module):
    def __init__(self, input_size, hidden_size=256, num_classes=8, pooling="mean", dropout=0.1, num_proj_layers=1):
        super().__init__()
        if pooling not in ("mean", "mean_std"):
            raise ValueError(f"pooling '{pooling}' is not 'mean' or 'mean_std'")
        self.pooling = pooling
        layers, size = [], input_size
        for _ in range(num_proj_layers):
            layers += [torch.nn.Linear(size, hidden_size), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            size = hidden_size
        self.frame_proj = torch.nn.Sequential(*layers)
        pooled = hidden_size * (2 if pooling == "mean_std" else 1)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(pooled, hidden_size), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden_size, num_classes))

    def pool(self, feats, mask):
        mean, std = masked_mean_std(self.frame_proj(feats), mask)
        return mean if self.pooling == "mean" else torch.cat([mean, std], dim=-1)

    def forward(self, feats, mask):
        """feats [B, T, D], mask [B, T] -> logits [B, num_classes]."""
        return self.classifier(self.pool(feats, mask))
