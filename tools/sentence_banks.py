"""Sentence banks of the synthetic mini corpora, read from tools/sentences.txt (the design table is in the
docstring of tools/make_mini_corpora.py).

``POOLS`` are the building blocks of the mini MSP-Podcast banks; ``CLASS_POOLS`` says which pools each consensus
letter draws from, so two classes share sentences exactly where they share a pool. ``LIBRI`` is the neutral,
emotion-free text of mini LibriSpeech (the file's "libri" pool) and shares no sentence with any MSP pool.
"""
import re
from pathlib import Path

from lobes.errors import DataError

SENTENCES_FILE = Path(__file__).with_name("sentences.txt")
LIBRI_POOL = "libri"
_POOL_LINE = re.compile(r"#\s*pool:\s*(\S+)\s*$")


def read_pools(path=SENTENCES_FILE):
    """``{pool name: [sentence, ...]}`` in file order."""
    path = Path(path)
    pools, current = {}, None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        m = _POOL_LINE.fullmatch(line)
        if m:
            if m.group(1) in pools:
                raise DataError(f"{path}:{n}: pool '{m.group(1)}' appears twice")
            current = pools[m.group(1)] = []
        elif line and not line.startswith("#"):
            if current is None:
                raise DataError(f"{path}:{n}: sentence before the first '# pool: NAME' line")
            current.append(line)
    return pools


_ALL = read_pools()
LIBRI = _ALL.pop(LIBRI_POOL)
POOLS = _ALL

CLASS_POOLS = {
    "A": ("blame", "common"),
    "C": ("blame", "common"),
    "D": ("disgust", "common"),
    "F": ("fear", "common"),
    "H": ("news", "common"),
    "N": ("plain", "common"),
    "S": ("plain", "common"),
    "U": ("news", "common"),
    # Rows that the recipe's preparation drops (other / no agreement): any MSP sentence.
    "O": tuple(POOLS),
    "X": tuple(POOLS),
}


def class_bank(letter):
    """Sentences of one consensus letter's bank, in a fixed order (pool order, then sentence order)."""
    return [s for pool in CLASS_POOLS[letter] for s in POOLS[pool]]


def all_sentences():
    """Every sentence of the MSP pools and of LIBRI, each once (e.g. text for a tiny LM)."""
    return [s for pool in POOLS.values() for s in pool] + list(LIBRI)
