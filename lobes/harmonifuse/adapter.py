"""Speech side of the HarmoniFuse speech LM: encoder frames -> LM positions.

* :func:`to_frame_mask`: the encoder's second output (bool mask, frame counts or relative lengths) -> mask.
* :class:`SpeechAdapter`: stack k consecutive frames, then an MLP to the LM width.
"""
import torch
import torch.nn.functional as F


def to_frame_mask(frames, num_frames):
    """Encoder's second output (bool mask / absolute counts / relative lengths) -> bool mask [B, T]."""
    if frames.dim() == 2:
        return frames[:, :num_frames].bool()
    if frames.is_floating_point():
        counts = torch.round(frames * num_frames).long()
    else:
        counts = frames.long()
    counts = counts.clamp(1, num_frames)
    return torch.arange(num_frames, device=frames.device)[None, :] < counts[:, None]


class SpeechAdapter(torch.nn.Module):
    """Downsample by stacking k consecutive frames, then Linear-ReLU-Linear to the LM width.

    [B, T, D] -> [B, ceil(T/k), out_dim]. Invalid frames are zeroed before stacking so padding never leaks
    into the last real stacked frame; an utterance of n frames keeps ceil(n/k) stacked frames. WavLM's
    50 Hz becomes 12.5 Hz for k=4, keeping LM sequences short.
    """

    def __init__(self, in_dim, out_dim, stack=4, hidden=None):
        super().__init__()
        self.stack = int(stack)
        hidden = hidden or out_dim
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(in_dim * self.stack, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out_dim))

    def forward(self, x, mask):
        b, t, d = x.shape
        k = self.stack
        x = x * mask[:, :, None].to(x.dtype)
        pad = (-t) % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, (t + pad) // k, k * d)
        n = (mask.sum(1) + k - 1) // k
        out_mask = torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]
        return self.proj(x), out_mask


