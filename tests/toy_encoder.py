"""A deterministic stand-in for WavLM shared by the HarmoniFuse tests: 80-sample frames, ``num_layers`` tanh layers
of width 16 after an input layer, returning (hidden states [L+1, B, T, 16], frame counts) as ``WavLMEncoder`` does,
so padding and loss tests stay exact without a real WavLM."""
import torch


class ToyEncoder(torch.nn.Module):
    hidden_size = 16

    def __init__(self, num_layers=3, seed=None):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.num_layers = num_layers
        self.layers = torch.nn.ModuleList(torch.nn.Linear(80 if i == 0 else 16, 16) for i in range(num_layers + 1))

    def forward(self, wavs, wav_lens):
        b, n = wavs.shape
        h, hs = wavs[:, : n // 80 * 80].reshape(b, n // 80, 80), []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            hs.append(h)
        return torch.stack(hs), torch.round(wav_lens * (n // 80)).long()
