"""Feature caching for setups whose backbone never changes during training.

Setup 1 (frozen base) and static-λ merges have no trainable parameter upstream of the hidden states, so
recomputing WavLM every epoch is wasted work: the hidden states of every utterance are computed once
(utterance by utterance, so no padding enters them) and the α + head training reads them back.

Storage: in memory (default) or, with ``cache_dir``, one safetensors file per split that is built by rank 0
and memory-mapped by every rank. Each entry is [T, L+1, D] (time first, so SpeechBrain's PaddedBatch pads
and measures time). Size: (L+1)·D·frames·bytes per utterance — for WavLM-Large at 50 frames/s that is
about 5 MB per second of audio in fp32, so store large corpora in float16 (``cache_dtype``) on a big disk.
"""
from pathlib import Path

import speechbrain as sb
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lobes.errors import DataError
from lobes.io_utils import atomic_path


@torch.no_grad()
def compute_features(encoder, dataset, device="cpu", dtype=torch.float32):
    """{utt_id: hidden states [T, L+1, D]} for every item of a dataset yielding ``id`` and ``sig``."""
    encoder.eval()
    feats = {}
    for item in dataset:
        wav = item["sig"].to(device)[None, :]
        hidden, mask = encoder(wav, torch.ones(1, device=device))
        feats[item["id"]] = hidden[:, 0, : int(mask.sum())].transpose(0, 1).to(dtype).cpu().contiguous()
    return feats


class FeatureCache:
    """Hidden states per utterance id, from memory or a safetensors file."""

    def __init__(self, feats=None, path=None):
        self.feats, self.path, self._handle = feats, path, None

    @classmethod
    def build(cls, encoder, dataset, cache_file=None, device="cpu", dtype=torch.float32):
        if cache_file is None:
            return cls(compute_features(encoder, dataset, device, dtype))
        cache_file = Path(cache_file)
        if not cache_file.exists():
            def _build():
                feats = compute_features(encoder, dataset, device, dtype)
                with atomic_path(cache_file) as tmp:
                    save_file(feats, tmp)
            sb.utils.distributed.run_on_main(_build)
        return cls(path=cache_file)

    def __getitem__(self, utt_id):
        if self.feats is not None:
            return self.feats[utt_id]
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        try:
            return self._handle.get_tensor(utt_id)
        except Exception as e:
            raise DataError(f"feature cache '{self.path}' has no entry for utterance '{utt_id}' ({e})")

    def pipeline(self):
        """A SpeechBrain dynamic item: utterance id -> ``feats``."""
        @sb.utils.data_pipeline.takes("id")
        @sb.utils.data_pipeline.provides("feats")
        def feats(utt_id):
            return self[utt_id].float()
        return feats
