"""Character vocabulary and text normalisation for CTC.

The vocabulary follows the HF wav2vec2/WavLM CTC convention (``[PAD]`` = CTC blank at index 0, ``|`` = word
delimiter, upper-case letters and the apostrophe), so a LibriSpeech ``WavLMForCTC`` head and our own heads
speak the same alphabet.

Normalisation (applied to MSP-Podcast transcripts and LibriSpeech alike):
1. upper-case;
2. every character that is not A-Z, apostrophe or whitespace becomes a space (punctuation, digits, symbols:
   MSP transcripts contain punctuation and the odd number; digits are dropped rather than verbalised);
3. apostrophes not inside a word are dropped; whitespace runs collapse to one space; ends are stripped.
"""
import re

import torch

BLANK = "[PAD]"
WORD_DELIMITER = "|"
VOCAB = [BLANK, WORD_DELIMITER, "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
CHAR_TO_INDEX = {c: i for i, c in enumerate(VOCAB)}

_NOT_ALLOWED = re.compile(r"[^A-Z' ]")
_LOOSE_APOSTROPHE = re.compile(r"(?<![A-Z])'|'(?![A-Z])")
_SPACES = re.compile(r"\s+")


def normalize_transcript(text):
    """Map raw transcript text to the CTC alphabet (see module docstring)."""
    text = _SPACES.sub(" ", str(text).upper())
    text = _NOT_ALLOWED.sub(" ", text)
    text = _LOOSE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def encode(text):
    """Normalised text -> LongTensor of vocabulary indices (space -> ``|``)."""
    return torch.tensor([CHAR_TO_INDEX[c] for c in text.replace(" ", WORD_DELIMITER)], dtype=torch.long)


def decode_indices(indices):
    """Indices (no blanks) -> text."""
    return "".join(VOCAB[int(i)] for i in indices).replace(WORD_DELIMITER, " ").strip()


def ctc_greedy_decode(log_probs, lengths=None, blank=0):
    """Best path decoding: argmax per frame, merge repeats, drop blanks. ``log_probs``: [B, T, V]."""
    best = log_probs.argmax(dim=-1)
    texts = []
    for b in range(best.shape[0]):
        n = best.shape[1] if lengths is None else int(lengths[b])
        seq, prev = [], None
        for tok in best[b, :n].tolist():
            if tok != prev and tok != blank:
                seq.append(tok)
            prev = tok
        texts.append(" ".join(decode_indices(seq).split()))
    return texts
