"""Export an ASR-CTC recipe's model as a transformers ``WavLMForCTC`` directory with its processor.

The directory (the recipe's ``export_folder``) then loads with the tools users already have::

    from transformers import pipeline
    asr = pipeline("automatic-speech-recognition", model="exp/.../finetuned_wavlm")
    asr("utt.wav")["text"]            # a path needs ffmpeg; or asr({"raw": samples, "sampling_rate": 16000})

and ``pipeline`` decodes greedily (best path) as the recipe does (``lobes.ctc.greedy_hyps``):

- ``config.json`` + ``model.safetensors``: ``WavLMForCTC`` whose ``wavlm.*`` weights are the fine-tuned backbone
  (the same tensors as ``export_finetuned_backbone`` writes, under HF's prefix, so ``WavLMModel.from_pretrained``
  and the task-vector import still read the backbone alone) and whose ``lm_head`` is the recipe's CTC head
  (a ``Linear`` on the last hidden state, which is what ``WavLMForCTC`` feeds its ``lm_head``);
  ``vocab_size`` = ``len(lobes.ctc_text.VOCAB)``, ``pad_token_id`` = the blank;
- ``vocab.json``, ``tokenizer_config.json``, ``special_tokens_map.json``: ``Wav2Vec2CTCTokenizer`` over
  ``lobes.ctc_text.VOCAB`` (``[PAD]`` = blank, ``|`` = word delimiter), no lower-casing and
  ``clean_up_tokenization_spaces`` off (it would glue `` ' `` to the previous word);
- ``preprocessor_config.json``: ``Wav2Vec2FeatureExtractor`` at 16 kHz with ``do_normalize`` = the encoder's
  ``normalize_wav`` (per-utterance zero mean / unit variance, ``lobes.wavlm_encoder.normalize_waveforms``).

One known difference: when the best path holds two word delimiters with only blanks between them,
transformers' tokenizer keeps both spaces and ours collapses them; the words, hence the WER, are the same.
"""
import shutil
from pathlib import Path

import speechbrain as sb
import torch

from lobes import ctc_text

SAMPLE_RATE = 16000


def _unwrap(module):
    return module.module if hasattr(module, "module") else module  # DDP


def ctc_tokenizer(folder):
    """A ``Wav2Vec2CTCTokenizer`` over ``lobes.ctc_text.VOCAB``; its ``vocab.json`` is written to ``folder``."""
    import json

    from transformers import Wav2Vec2CTCTokenizer

    vocab_file = Path(folder) / "vocab.json"
    vocab_file.write_text(json.dumps(ctc_text.CHAR_TO_INDEX, ensure_ascii=True), encoding="utf-8")
    # [UNK] is not in VOCAB (normalised text has no unknown character): transformers adds it after the head's
    # outputs, so the model never emits it
    return Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="[UNK]", pad_token=ctc_text.BLANK, bos_token=None,
                                eos_token=None, word_delimiter_token=ctc_text.WORD_DELIMITER, do_lower_case=False,
                                clean_up_tokenization_spaces=False)


def _ctc_model(encoder, ctc_head):
    """A ``WavLMForCTC`` sharing ``encoder``'s WavLM and ``ctc_head``'s weights (no copy of the backbone)."""
    from transformers import WavLMForCTC

    config = encoder.model.config.__class__.from_dict(encoder.model.config.to_dict())
    config.vocab_size = len(ctc_text.VOCAB)
    config.pad_token_id = ctc_text.CHAR_TO_INDEX[ctc_text.BLANK]
    config.ctc_loss_reduction = "mean"  # as lobes.ctc.ctc_loss
    config.ctc_zero_infinity = True
    with torch.device("meta"):  # the modules are replaced below: no random init of a second WavLM
        model = WavLMForCTC(config)
    model.wavlm = encoder.model
    model.lm_head = ctc_head
    return model


def export_ctc_model(encoder, ctc_head, out_dir):
    """Write ``out_dir`` (replaced atomically) as a ``WavLMForCTC`` + processor directory (module docstring).

    ``encoder``: the recipe's ``WavLMEncoder``; ``ctc_head``: its ``torch.nn.Linear`` over ``ctc_text.VOCAB``."""
    from transformers import Wav2Vec2FeatureExtractor

    out_dir = Path(out_dir)
    if not sb.utils.distributed.if_main_process():
        return out_dir
    encoder, ctc_head = _unwrap(encoder), _unwrap(ctc_head)
    if ctc_head.out_features != len(ctc_text.VOCAB):
        raise ValueError(f"CTC head has {ctc_head.out_features} outputs, the vocabulary {len(ctc_text.VOCAB)}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {f"wavlm.{k}": v for k, v in encoder.export_state().items()}  # without training-only keys
    state.update({f"lm_head.{k}": v for k, v in ctc_head.state_dict().items()})
    _ctc_model(encoder, ctc_head).save_pretrained(tmp, safe_serialization=True, state_dict=state)
    ctc_tokenizer(tmp).save_pretrained(tmp)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                             do_normalize=bool(encoder.normalize_wav),
                             return_attention_mask=True).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
