"""The one audio reader of the toolkit: header checks and decoding, for training data and for inference.

``check_audio`` and ``audio_info`` read the header only, so data preparation can validate a corpus the
size of MSP-Podcast without decoding it. ``read_audio`` decodes: training data must already be mono at the
recipe's rate (a mismatch is a DataError naming the file), while inference (``convert=True``) accepts any file
libsndfile reads, averaging its channels and resampling it.
"""
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from lobes.errors import DataError


def audio_info(path):
    """Return ``(sample_rate, num_frames, channels)`` from the file header (no decoding)."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises its own error types for corrupt/unknown headers
        reason = "no such file" if not Path(path).exists() else f"unreadable or corrupt audio file ({e})"
        raise DataError(f"{path}: {reason}") from e
    return int(info.samplerate), int(info.frames), int(info.channels)


def _validate(path, sample_rate, num_frames, channels, expected_sr):
    if num_frames <= 0:
        raise DataError(f"{path}: audio file has 0 samples")
    if expected_sr is not None and sample_rate != expected_sr:
        raise DataError(f"{path}: sample rate {sample_rate} Hz, expected {expected_sr} Hz")
    if channels != 1:
        raise DataError(f"{path}: {channels} channels, training data must be mono")


def check_audio(path, expected_sr=16000):
    """Validate header (readable, >0 samples, mono, ``expected_sr``) and return the duration in seconds."""
    sample_rate, num_frames, channels = audio_info(path)
    _validate(path, sample_rate, num_frames, channels, expected_sr)
    return num_frames / sample_rate


def read_audio(path, expected_sr=16000, convert=False):
    """Decode ``path`` into a 1-D float32 tensor in [-1, 1] at ``expected_sr``.

    ``convert=False`` (training data): the file must be mono at ``expected_sr``. ``convert=True`` (inference on
    any file): its channels are averaged, then it is resampled to ``expected_sr``. Either way a file that cannot be
    decoded, holds 0 samples or NaN/inf raises DataError naming it.
    """
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        reason = "no such file" if not Path(path).exists() else f"unreadable or corrupt audio file ({e})"
        raise DataError(f"{path}: {reason}") from e
    if not convert:
        _validate(path, sample_rate, data.shape[0], data.shape[1], expected_sr)
        wav = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    elif data.shape[0] == 0:
        raise DataError(f"{path}: audio file has 0 samples")
    else:
        wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    if not torch.isfinite(wav).all():
        raise DataError(f"{path}: audio holds NaN/inf samples")
    if convert and sample_rate != expected_sr:
        import torchaudio.functional as AF  # imported here: training never resamples

        wav = AF.resample(wav, sample_rate, expected_sr)
    return wav
