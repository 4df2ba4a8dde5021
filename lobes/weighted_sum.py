"""Eq. (5): H_out = Σ_l α_l H^(l), with α = softmax(w) over the layer outputs.

w starts at zero (uniform α), as in the s3prl featurizer. By default the CNN output (hidden state 0) is left
out, as in the paper (24 transformer outputs); ``include_cnn=True`` adds it (25 weights, as vox-profile does).
``layer_norm=True`` normalises each layer before weighting (s3prl's option), so no layer wins by scale alone.
"""
import torch
import torch.nn.functional as F


class WeightedLayerSum(torch.nn.Module):
    """Eq. (5): learnable weighted sum of an encoder's layer outputs, α = softmax(w) (see module doc).

    Arguments
    ---------
    num_layers : int
        Number of transformer layer outputs weighted (the CNN output not counted).
    include_cnn : bool
        Also weight the CNN output (hidden state 0): ``num_layers + 1`` weights.
    layer_norm : bool
        Layer-normalise each layer output before weighting, so no layer wins by scale alone.
    """

    def __init__(self, num_layers, include_cnn=False, layer_norm=False):
        super().__init__()
        self.include_cnn = include_cnn
        self.layer_norm = layer_norm
        self.weights = torch.nn.Parameter(torch.zeros(num_layers + int(include_cnn)))

    def alpha(self):
        """α: the softmax-normalised layer weights (sum to 1)."""
        return F.softmax(self.weights, dim=0)

    def forward(self, hidden_states):
        """hidden_states: [L+1, B, T, D] (index 0 = CNN output) -> [B, T, D]."""
        h = hidden_states if self.include_cnn else hidden_states[1:]
        if h.shape[0] != self.weights.numel():
            raise ValueError(f"WeightedLayerSum expects {self.weights.numel()} layers, got {h.shape[0]}")
        if self.layer_norm:
            h = F.layer_norm(h, h.shape[-1:])
        return torch.einsum("l,lbtd->btd", self.alpha().to(h.dtype), h)
