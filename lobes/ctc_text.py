"""Character vocabulary and text normalisation for CTC.

The vocabulary follows the HF wav2vec2/WavLM CTC convention (``[PAD]`` = CTC blank at index 0, ``|`` = word
delimiter, upper-case letters and the apostrophe), so a LibriSpeech ``WavLMForCTC`` head and our own heads
speak the same alphabet.

Normalisation (``normalize_transcript``; MSP-Podcast, LibriSpeech and IEMOCAP transcripts alike), in order:
1. Unicode folded to ASCII: typographic apostrophes become ``'``; NFKD splits accented letters into letter +
   combining mark and the marks are dropped ("café" -> "cafe", full-width digits -> digits); a few letters
   without a decomposition are spelled (``ß`` -> ``ss``, ``æ`` -> ``ae``, ``ø`` -> ``o`` ...); anything still
   outside ASCII is dropped (after step 3, so that ``£`` and ``€`` can still be read);
2. bracketed non-speech annotations are removed with their content: ``[laughter]``, ``(noise)``, ``<unk>``,
   ``{breath}`` (podcast and IEMOCAP transcripts mark laughter, breathing and garbage this way);
3. numbers are spelled out with num2words (a maintained library; English readings): thousands
   separators are dropped ("1,000"), ``50%`` -> "fifty percent", ``$5`` -> "five dollars", ordinals
   ``3rd`` -> "third", decimals ``3.10`` -> "three point one zero" (digits after the point read one by one, as
   spoken), a lone 4-digit integer in 1100-2099 reads as a year (``1990`` -> "nineteen ninety", ``2020`` ->
   "twenty twenty", ``2005`` -> "two thousand and five"), decades ``1990s`` / ``'80s`` -> "nineteen nineties" /
   "eighties", other integers as cardinals except leading-zero or over-15-digit ones (ids, phone numbers),
   read digit by digit; ``&`` -> "and";
4. upper-case; every character that is not A-Z, apostrophe or whitespace becomes a space (punctuation,
   hyphens of "twenty-one", symbols);
5. apostrophes not inside a word are dropped (``DON'T`` keeps its apostrophe, the alphabet has one; quotes
   like ``'hello'`` lose theirs); whitespace runs collapse to one space; ends are stripped.

The result can be empty (a transcript that is only "[laughter]" or "..."); prepare scripts leave such
utterances out of the ASR subset and list them (never an abort).
"""
import re
import unicodedata

import torch
from num2words import num2words

BLANK = "[PAD]"
WORD_DELIMITER = "|"
VOCAB = [BLANK, WORD_DELIMITER, "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
CHAR_TO_INDEX = {c: i for i, c in enumerate(VOCAB)}

_NOT_ALLOWED = re.compile(r"[^A-Z' ]")
_LOOSE_APOSTROPHE = re.compile(r"(?<![A-Z])'|'(?![A-Z])")
_SPACES = re.compile(r"\s+")

# Characters NFKD does not decompose into ASCII but that have a conventional ASCII spelling.
_ASCII_SPELLING = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'",  # apostrophes / quotes
    "\u00df": "ss", "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE", "\u00f8": "o", "\u00d8": "O",
    "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D", "\u00f0": "d", "\u00d0": "D", "\u00fe": "th",
    "\u00de": "TH", "\u0131": "i",
    "\u2044": "/", "\u2013": "-", "\u2014": "-", "\u00a0": " ",
})
# Non-speech annotations: [laughter], (noise), <unk>, {breath}; no nesting in real transcripts.
_BRACKETED = re.compile(r"\[[^\[\]]*\]|\([^()]*\)|<[^<>]*>|\{[^{}]*\}")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d,]*\d)")
_CURRENCY = {"$": "dollars", "\u00a3": "pounds", "\u20ac": "euros"}
# One numeric token: optional currency sign, digits, optional decimal part, optional ordinal suffix or %.
_NUMBER = re.compile(r"(?P<cur>[$\u00a3\u20ac])?(?P<int>\d+)(?:\.(?P<frac>\d+))?"
                     r"(?:(?P<ord>st|nd|rd|th)\b|(?P<pl>'?s)\b|\s?(?P<pct>%))?", re.IGNORECASE)


def _decompose(text):
    """NFKD with combining marks dropped and the spelling table applied; non-ASCII symbols (£, €) survive."""
    text = unicodedata.normalize("NFKD", str(text).translate(_ASCII_SPELLING))
    return "".join(c for c in text if not unicodedata.combining(c)).translate(_ASCII_SPELLING)


def fold_to_ascii(text):
    """Unicode -> ASCII: accents dropped (NFKD), a few letters spelled, anything else non-ASCII dropped."""
    return _decompose(text).encode("ascii", "ignore").decode("ascii")


def remove_annotations(text):
    """Drop bracketed non-speech annotations (``[laughter]``, ``(noise)``, ``<unk>``, ``{breath}``)."""
    return _BRACKETED.sub(" ", text)


def _digit_by_digit(digits):
    return " ".join(num2words(int(d)) for d in digits)


def _cardinal(digits):
    if len(digits) > 1 and digits[0] == "0" or len(digits) > 15:  # "007", ids and phone numbers: digit by digit
        return _digit_by_digit(digits)
    try:
        return num2words(int(digits))
    except (OverflowError, NotImplementedError):  # beyond num2words' range
        return _digit_by_digit(digits)


def _spell_number(m):
    integer, frac, ordinal, pct, cur = m.group("int"), m.group("frac"), m.group("ord"), m.group("pct"), m.group("cur")
    if m.group("pl") and frac is None and cur is None and len(integer) in (2, 4):  # decades: 1990s, '80s
        words = num2words(int(integer), to="year") if len(integer) == 4 else num2words(int(integer))
        return f" {words[:-1] + 'ies' if words.endswith('y') else words + 's'} "
    if ordinal and frac is None:
        words = num2words(int(integer), to="ordinal")
    elif frac is not None:
        words = _cardinal(integer) + " point " + _digit_by_digit(frac)
    elif (cur is None and pct is None and len(integer) == 4 and integer[0] != "0"
          and 1100 <= int(integer) <= 2099):
        words = num2words(int(integer), to="year")
    else:
        words = _cardinal(integer)
    if (ordinal or m.group("pl")) and frac is not None:  # "3.5th" has no reading; keep the letters
        words += " " + (ordinal or m.group("pl"))
    if pct:
        words += " percent"
    if cur:
        words += " " + _CURRENCY[cur]
    return f" {words} "


def spell_numbers(text):
    """Digits -> English words with num2words (see the module docstring for the readings)."""
    text = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), text)
    text = _NUMBER.sub(_spell_number, text)
    return text.replace("&", " and ")


def normalize_transcript(text):
    """Map raw transcript text to the CTC alphabet (see module docstring); may return ''."""
    text = spell_numbers(remove_annotations(_decompose(text)))  # before the ASCII fold: keeps £ and €
    text = _SPACES.sub(" ", text.encode("ascii", "ignore").decode("ascii").upper())
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
