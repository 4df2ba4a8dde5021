"""Shareable artefacts of a trained HarmoniFuse speech LM, in the formats the libraries read.

The SpeechBrain checkpoint (``save/``, :class:`lobes.harmonifuse.checkpoint.TrainableParameters`) is for resuming;
what others load is written beside it after the test, in one folder:

- the LM, by ``lm_mode``: ``lora`` -> ``lm_adapter/`` (peft's ``save_pretrained``: adapter_config.json +
  adapter_model.safetensors, loadable by ``PeftModel.from_pretrained(base, lm_adapter)``); ``full`` -> ``lm/``
  (transformers ``save_pretrained`` + the tokenizer); ``frozen`` -> nothing, the base LM is referenced.
  An export (``tools/export_harmonifuse.py``) writes ``lm/`` in every mode (LoRA merged by ``merge_and_unload``).
- ``speech_modules.safetensors``: every speech-side weight of the model (encoder fusion, adapter, LM-layer
  fusion, soft prompts, the classify head) and the WavLM when any of it trained (``encoder.model.*``); a frozen
  WavLM is referenced by its source instead.
- ``speech_modules.json`` (written last: a folder without it is incomplete): where the LM comes from (``lm``:
  ``kind`` adapter | model | base, ``dir`` relative to the folder, ``base`` source), the WavLM (``encoder``:
  its config when included, else its source), the settings groups that rebuild the
  :class:`lobes.harmonifuse.speech_lm.SpeechLM`, and the decoding settings of the experiment (``decoding``).

:func:`load_artefacts` rebuilds the model from such a folder; ``lm_source`` / ``wavlm_source`` say where a
referenced LM / WavLM is now when it moved.
"""
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from lobes.errors import DataError
from lobes.io_utils import atomic_dir, atomic_write
from lobes.safetensors_io import read_safetensors, write_safetensors
from lobes.wavlm_encoder import WavLMShape

logger = logging.getLogger(__name__)
FORMAT = 1
SPEECH_FILE = "speech_modules.safetensors"
INFO_FILE = "speech_modules.json"
ADAPTER_DIR = "lm_adapter"
LM_DIR = "lm"
# the experiment's decoding settings, kept so that a shared model decodes as the experiment's test did
DECODING_KEYS = ("train_tasks", "asr_max_decode_len", "ser_max_decode_len", "num_beams", "length_penalty")


class SharedWavLM(WavLMShape, torch.nn.Module):
    """A fine-tuned WavLM rebuilt from its config and weights (no source checkpoint needed), with the
    ``forward(wavs, wav_lens) -> (hidden states, frame mask)`` of :class:`lobes.wavlm_encoder.WavLMEncoder` in
    eval mode; its parameters are named as there (``model.*``)."""

    def __init__(self, config, normalize_wav=True):
        from transformers import WavLMConfig, WavLMModel

        super().__init__()
        self.model = WavLMModel(WavLMConfig.from_dict(dict(config))).eval()
        self.normalize_wav = bool(normalize_wav)

    @torch.no_grad()
    def forward(self, wavs, wav_lens):
        from lobes.wavlm_encoder import run_wavlm

        self.model.eval()
        return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)


def decoding_settings(hparams):
    """The :data:`DECODING_KEYS` of a recipe's hparams (a mapping or SpeechBrain's namespace)."""
    get = hparams.__getitem__ if isinstance(hparams, dict) else hparams.__getattribute__
    try:
        return {k: list(get(k)) if k == "train_tasks" else get(k) for k in DECODING_KEYS}
    except (KeyError, AttributeError) as e:
        raise DataError(f"hparams lack {e}, needed to share the model's decoding settings") from e


def _source(value):
    """A local path made absolute (the folder may be read from elsewhere), a hub id kept as it is."""
    value = str(value)
    return os.path.abspath(value) if os.path.exists(value) else value


def speech_state(model, include_encoder=False):
    """(speech-side weights {name: tensor}, whether the WavLM is among them): every entry of the state dict
    outside ``lm.``; the encoder's when some encoder parameter trained (or it was shared so, or
    ``include_encoder``)."""
    encoder_trained = include_encoder or isinstance(model.encoder, SharedWavLM) or any(
        p.requires_grad for p in model.encoder.parameters())
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("lm.") or (name.startswith("encoder.") and not encoder_trained):
            continue
        state[name] = value.detach().cpu().contiguous()
    return state, encoder_trained


def _encoder_info(model, included):
    from lobes.wavlm_encoder import WavLMEncoder

    enc = model.encoder
    if not isinstance(enc, (WavLMEncoder, SharedWavLM)):
        raise DataError(f"the speech encoder is a {type(enc).__name__}; only a WavLM encoder can be shared")
    info = {"included": included, "normalize_wav": bool(enc.normalize_wav)}
    if included:
        info["config"] = enc.model.config.to_dict()
    else:
        info["source"] = _source(enc.model.config.name_or_path)
    return info


def model_info(model, lm, decoding, include_encoder=False):
    """(the JSON of :data:`INFO_FILE`, the speech-side weights) of ``model``; ``lm`` = the JSON's ``lm`` section
    (kind, dir, base; it may set ``trained_mode``)."""
    settings = {k: dataclasses.asdict(v) for k, v in model.settings.items() if k != "lm"}
    lm_settings = model.settings["lm"]
    dtype = lm_settings.dtype if isinstance(lm_settings.dtype, str) else str(lm_settings.dtype).split(".")[-1]
    state, included = speech_state(model, include_encoder)
    info = {"format": FORMAT, "lm": {"trained_mode": model.lm_mode, "dtype": dtype,
                                      "attn_implementation": lm_settings.attn_implementation, **lm},
            "encoder": _encoder_info(model, included), "tasks": list(model.tasks), **settings,
            "loss_chunk_size": model.loss_chunk_size, "decoding": dict(decoding)}
    return info, state


def save_lm_dir(hf_lm, tokenizer, out):
    """transformers ``save_pretrained`` of the LM and its tokenizer into the new folder ``out`` (atomically)."""
    with atomic_dir(out, "config.json", "lobes.harmonifuse.artefacts") as stage:
        hf_lm.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)


def write_speech_modules(model, folder, lm, decoding, include_encoder=False):
    """``speech_modules.safetensors``, then ``speech_modules.json`` (its presence marks a complete folder);
    ``include_encoder``: also a frozen WavLM (an export needs no source then)."""
    info, state = model_info(model, lm, decoding, include_encoder)
    folder = Path(folder)
    write_safetensors(state, folder / SPEECH_FILE)
    with atomic_write(folder / INFO_FILE) as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return folder / INFO_FILE


def write_artefacts(model, folder, decoding):
    """Write the experiment's shareable artefacts (module doc) for the trained ``model`` into ``folder``; returns
    the info file's path (None, with a warning, for an LM built by ``lm_from_config``: no base to reference)."""
    folder = Path(folder)
    (folder / INFO_FILE).unlink(missing_ok=True)  # incomplete until rewritten last
    base = _source(model.settings["lm"].source)
    if model.settings["lm"].from_config:
        logger.warning("lm_from_config: the base LM has random weights that cannot be re-read from lm_source; "
                       "no shareable artefacts are written to %s", folder)
        return None
    for stale in (ADAPTER_DIR, LM_DIR):
        shutil.rmtree(folder / stale, ignore_errors=True)
    if model.lm_mode == "lora":
        with atomic_dir(folder / ADAPTER_DIR, "adapter_config.json", "lobes.harmonifuse.artefacts") as stage:
            model.lm.save_pretrained(stage)
        lm = {"kind": "adapter", "dir": ADAPTER_DIR, "base": base}
    elif model.lm_mode == "full":
        save_lm_dir(model.hf_lm, model.tokenizer, folder / LM_DIR)
        lm = {"kind": "model", "dir": LM_DIR, "base": base}
    else:
        lm = {"kind": "base", "dir": None, "base": base}
    return write_speech_modules(model, folder, lm, decoding)


def read_info(folder):
    path = Path(folder) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; {folder} holds no shared HarmoniFuse model") from e
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if info.get("format") != FORMAT:
        raise DataError(f"{path}: format {info.get('format')!r}, this toolkit reads format {FORMAT}")
    return info


def _build_encoder(info, wavlm_source):
    from lobes.wavlm_encoder import WavLMEncoder

    enc = info["encoder"]
    if enc["included"]:
        return SharedWavLM(enc["config"], enc["normalize_wav"])
    return WavLMEncoder(wavlm_source or enc["source"], freeze=True, normalize_wav=enc["normalize_wav"])


def _lm_settings(info, folder, lm_source):
    """LMSettings of the frozen LM to build: the base (kinds base / adapter) or the saved LM (kind model)."""
    from lobes.harmonifuse.lm_loading import LMSettings

    lm = info["lm"]
    source = lm_source or (str(folder / lm["dir"]) if lm["kind"] == "model" else lm["base"])
    return LMSettings(source=str(source), mode="frozen", dtype=lm["dtype"],
                      attn_implementation=lm["attn_implementation"])


def load_artefacts(folder, lm_source=None, wavlm_source=None, device="cpu"):
    """(:class:`SpeechLM` in eval mode with the shared weights, the folder's info incl. ``decoding``).

    ``lm_source``: where the LM this folder needs is now (the base LM of kinds base / adapter, the LM of kind
    model); ``wavlm_source``: where a referenced (frozen) WavLM is now."""
    from lobes.harmonifuse.settings import FusionSettings, PromptSettings, SERSettings, SpeechSettings
    from lobes.harmonifuse.speech_lm import SpeechLM

    folder = Path(folder)
    info = read_info(folder)
    with torch.random.fork_rng(devices=[]):  # random inits (overwritten below) leave the caller's stream alone
        model = SpeechLM(_build_encoder(info, wavlm_source), _lm_settings(info, folder, lm_source),
                         tasks=info["tasks"], speech=SpeechSettings(**info["speech"]),
                         prompts=PromptSettings(**info["prompts"]), fusion=FusionSettings(**info["fusion"]),
                         ser=SERSettings(**info["ser"]), loss_chunk_size=info["loss_chunk_size"])
    if info["lm"]["kind"] == "adapter":
        from peft import PeftModel

        model.lm = PeftModel.from_pretrained(model.lm, str(folder / info["lm"]["dir"]))
    path = folder / SPEECH_FILE
    state, _ = read_safetensors(path, "speech modules file")
    missing, unexpected = model.load_state_dict(state, strict=False)
    skip = ("lm.",) if info["encoder"]["included"] else ("lm.", "encoder.")
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise DataError(f"{path}: does not match the model of {folder / INFO_FILE} (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    return model.requires_grad_(False).to(device).eval(), info
