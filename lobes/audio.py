"""Audio file checks and loading for training data (mono, fixed sample rate).

``check_audio`` and ``audio_info`` read the header only, so data preparation can validate a corpus the
size of MSP-Podcast without decoding it; ``read_audio`` decodes and applies the same checks.
"""
import numpy as np
import soundfile as sf
import torch

from lobes.errors import DataError


def audio_info(path):
    """Return ``(sample_rate, num_frames, channels)`` from the file header (no decoding)."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises its own error types for corrupt/unknown headers
        raise DataError(f"{path}: unreadable or corrupt audio file ({e})") from e
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


def read_audio(path, expected_sr=16000):
    """Decode a mono file at ``expected_sr`` into a 1-D float32 tensor in [-1, 1]."""
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{path}: unreadable or corrupt audio file ({e})") from e
    _validate(path, sample_rate, data.shape[0], data.shape[1], expected_sr)
    return torch.from_numpy(np.ascontiguousarray(data[:, 0]))
