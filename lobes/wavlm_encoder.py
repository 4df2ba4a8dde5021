"""WavLM as a feature extractor that returns every hidden state, from a hub id or a local directory.

``wavlm_source`` in every recipe goes through :func:`load_wavlm`: ``microsoft/wavlm-large`` (downloaded by
transformers on a machine with network access) or a local ``save_pretrained`` directory (the tiny model of the
tests and demo, or a pre-downloaded WavLM-Large).

Hidden-state convention (HF ``output_hidden_states``): index 0 is the CNN + positional-convolution output
(the input of transformer layer 1), index l (1..L) is the output of transformer layer l; with stable layer
norm (WavLM-Large) the final encoder layer norm is applied to index L only.
"""
import contextlib
import logging

import torch
from transformers import WavLMConfig, WavLMModel

from lobes.errors import DataError

logger = logging.getLogger(__name__)


def load_wavlm(source, cache_dir=None, layerdrop=0.0, apply_spec_augment=False, output_loading_info=False,
               **config_overrides):
    """Load a ``WavLMModel``. LayerDrop is off by default: a weighted layer sum needs every layer every step.

    ``config_overrides`` set WavLMConfig fields (``mask_time_prob``, ...). ``output_loading_info=True`` also
    returns HF's loading info (``missing_keys``: parameters the checkpoint did not hold, newly initialised)."""
    try:
        config = WavLMConfig.from_pretrained(source, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise DataError(f"wavlm_source '{source}' is neither a local WavLM directory nor a reachable hub id: {e}") from e
    config.layerdrop = layerdrop
    config.apply_spec_augment = apply_spec_augment
    if not hasattr(config, "mask_feature_min_masks"):
        # HF WavLMModel reads it for channel masking, but WavLMConfig (transformers 4.57) lacks the field, so
        # mask_feature_prob > 0 raised AttributeError; 0 is Wav2Vec2Config's default
        config.mask_feature_min_masks = 0
    for k, v in config_overrides.items():
        setattr(config, k, v)
    return WavLMModel.from_pretrained(source, config=config, cache_dir=cache_dir,
                                      output_loading_info=output_loading_info)


def lengths_to_mask(rel_lens, max_len):
    """SpeechBrain relative lengths (fraction of the longest item) -> bool mask [B, max_len]."""
    abs_lens = torch.round(rel_lens.float() * max_len).long().clamp(1, max_len)
    return torch.arange(max_len, device=rel_lens.device)[None, :] < abs_lens[:, None]


def normalize_waveforms(wavs, mask):
    """Zero mean, unit variance per utterance over its valid samples (WavLM-Large's input normalisation)."""
    m = mask.to(wavs.dtype)
    n = m.sum(1, keepdim=True)
    mean = (wavs * m).sum(1, keepdim=True) / n
    var = (((wavs - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (wavs - mean) / torch.sqrt(var + 1e-7) * m


def frame_mask(model, sample_mask):
    """Mask of valid output frames, from the valid-sample mask, using the CNN's length arithmetic."""
    frame_lens = model._get_feat_extract_output_lengths(sample_mask.sum(1))
    n_frames = model._get_feat_extract_output_lengths(torch.tensor(sample_mask.shape[1])).item()
    return torch.arange(n_frames, device=sample_mask.device)[None, :] < frame_lens[:, None]


@contextlib.contextmanager
def _foldable_weights(model):
    """Without autograd, let frozen weights report requires_grad=True while the model runs.

    Why: WavLM's attention applies q/k/v projections to a transposed [T, B, D] view. For such an input,
    ``torch.matmul`` folds it into one GEMM only when the weight requires grad; otherwise it runs a bmm over
    the weight expanded T times, which is 2x slower on CPU (benchmarks/RESULTS.md, "frozen weights"). Under
    no_grad / inference_mode the flag records nothing, so this only picks the faster kernel.
    """
    if torch.is_grad_enabled() or not hasattr(model, "parameters"):
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def run_wavlm(model, wavs, wav_lens, normalize=True):
    """Run any WavLM-shaped module; returns (hidden states [L+1, B, T, D], frame mask [B, T])."""
    if wavs.dim() != 2:
        raise DataError(f"expected a batch of mono waveforms [B, samples], got shape {tuple(wavs.shape)}")
    mask = lengths_to_mask(wav_lens, wavs.shape[1])
    if normalize:
        wavs = normalize_waveforms(wavs, mask)
    # HF WavLM draws torch.rand per layer for LayerDrop even in eval mode: a frozen (eval) backbone must not
    # move the global RNG stream, or the head's dropout masks would depend on whether features were cached.
    keep_rng = torch.random.fork_rng(devices=[]) if not getattr(model, "training", True) else contextlib.nullcontext()
    with keep_rng, _foldable_weights(model):
        out = model(wavs, attention_mask=mask.long(), output_hidden_states=True)
    hidden = torch.stack(out.hidden_states, dim=0)
    fmask = frame_mask(model, mask)[:, : hidden.shape[2]]
    return hidden, fmask


class WavLMShape:
    """``num_layers`` / ``hidden_size`` of a module that holds a transformers WavLM as ``self.model``."""

    @property
    def num_layers(self):
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self):
        return self.model.config.hidden_size


class WavLMEncoder(WavLMShape, torch.nn.Module):
    """A plain (fine-tunable or frozen) WavLM returning all hidden states.

    Used by the ASR-CTC, SER and MTL recipes; AdaLTM uses :class:`lobes.adaltm.merged_wavlm.MergedWavLM`, which has
    the same ``forward`` contract.

    Fine-tuning regularisers (HF WavLM's own, active only in train mode): SpecAugment-style masking of the
    CNN features before the transformer -- time spans of ``mask_time_length`` frames replaced by the learnt
    ``masked_spec_embed`` (``mask_time_prob``: share of frames starting a span; at least ``mask_time_min_masks``
    spans per utterance, a large share of a short one), channel spans of
    ``mask_feature_length`` zeroed (``mask_feature_prob``) -- and LayerDrop (``layerdrop``: probability of
    skipping each transformer layer but the first). A frozen backbone runs in eval mode, so neither applies.

    Arguments
    ---------
    source : str
        HF hub id or local directory of a WavLM checkpoint.
    freeze : bool
        Freeze every WavLM weight and run it in eval mode (feature extraction only).
    freeze_feature_extractor : bool
        Keep the CNN feature extractor frozen while the transformer fine-tunes.
    normalize_wav : bool
        Zero-mean, unit-variance each utterance over its valid samples (WavLM-Large's input normalisation).
    gradient_checkpointing : bool
        Recompute the transformer layers in backward instead of saving their activations.
    cache_dir : str or None
        transformers cache directory for hub downloads.
    apply_spec_augment : bool
        Turn on HF WavLM's train-time time/channel masking (the ``mask_*`` settings below).
    mask_time_prob : float
        Share of frames that start a masked time span, in [0, 1).
    mask_time_length : int
        Frames per masked time span.
    mask_time_min_masks : int
        Least number of masked time spans per utterance.
    mask_feature_prob : float
        Share of channels that start a zeroed channel span, in [0, 1).
    mask_feature_length : int
        Channels per zeroed channel span.
    layerdrop : float
        LayerDrop: probability of skipping each transformer layer but the first in training, in [0, 1).
    """

    def __init__(self, source, freeze=False, freeze_feature_extractor=True, normalize_wav=True,
                 gradient_checkpointing=False, cache_dir=None, apply_spec_augment=False, mask_time_prob=0.0,
                 mask_time_length=10, mask_time_min_masks=2, mask_feature_prob=0.0, mask_feature_length=10,
                 layerdrop=0.0):
        super().__init__()
        augment = {"apply_spec_augment": apply_spec_augment, "mask_time_prob": mask_time_prob,
                   "mask_time_length": mask_time_length, "mask_time_min_masks": mask_time_min_masks,
                   "mask_feature_prob": mask_feature_prob,
                   "mask_feature_length": mask_feature_length, "layerdrop": layerdrop}
        for k in ("mask_time_prob", "mask_feature_prob", "layerdrop"):
            if not 0.0 <= augment[k] < 1.0:
                raise DataError(f"{k}: {augment[k]!r} must be in [0, 1)")
        if freeze and (layerdrop > 0 or (apply_spec_augment and (mask_time_prob > 0 or mask_feature_prob > 0))):
            logger.warning("wavlm: freeze=True runs WavLM in eval mode; masking / LayerDrop settings are ignored")
        if not apply_spec_augment:
            # masking off: the source's own mask_* values stay, so no masked_spec_embed is created that the
            # checkpoint lacks (a static merge or task vector of the base's keys would not fit the model)
            augment = {"apply_spec_augment": False, "layerdrop": layerdrop}
        loaded = load_wavlm(source, cache_dir=cache_dir, output_loading_info=True, **augment)
        self.model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
        # Parameters the source checkpoint lacks (masked_spec_embed of a checkpoint saved without masking):
        # used only by train-time masking; the export leaves them out so W_ft has exactly W_base's keys.
        self.training_only_keys = sorted(info.get("missing_keys", []))
        if "masked_spec_embed" in self.training_only_keys:
            # from_pretrained leaves a parameter the checkpoint lacks uninitialised (WavLM's _init_weights skips
            # it): garbage up to 1e38 and a NaN loss at the first masked step. U[0, 1) as HF's own __init__.
            with torch.no_grad():
                self.model.masked_spec_embed.uniform_()
        if getattr(self.model, "masked_spec_embed", None) is not None and not (apply_spec_augment and mask_time_prob > 0):
            # used only by time masking: without it, a trainable parameter with no gradient would stop DDP
            self.model.masked_spec_embed.requires_grad_(False)
        self.normalize_wav = normalize_wav
        self.freeze = freeze
        if freeze:
            self.model.requires_grad_(False)
        if freeze or freeze_feature_extractor:
            # The CNN is kept frozen during fine-tuning, as in wav2vec2/WavLM CTC recipes. HF's
            # freeze_feature_encoder also clears the encoder's _requires_grad flag: with requires_grad_(False)
            # alone, WavLMFeatureEncoder marks its input as requiring grad in train mode, so autograd still
            # records the CNN and saves its activations (about 0.1 GB per second of audio at WavLM-Large
            # shape; benchmarks/RESULTS.md "CNN freeze").
            self.model.freeze_feature_encoder()
        spec_embed = getattr(self.model, "masked_spec_embed", None)
        if spec_embed is not None and not self.model.config.apply_spec_augment:
            # only SpecAugment reads it: a trainable parameter without a gradient stops DDP at the second step
            spec_embed.requires_grad_(False)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def export_state(self):
        """The fine-tuned weights to export (without ``training_only_keys``)."""
        return {k: v for k, v in self.model.state_dict().items() if k not in self.training_only_keys}

    def forward(self, wavs, wav_lens):
        if self.freeze:
            self.model.eval()
            with torch.no_grad():
                return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)
        return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)
