"""Generated English sentences for pretraining the tiny models (speech for the WavLM, text for the causal LM).

A small phrase grammar, a pure function of its seed: ``generated_sentences(seed, n)``. Words are plain letters
only (no digits or abbreviations), so espeak-ng speaks exactly the written words, as in tools/sentences.txt.
"""
import random

SUBJECTS = ["the old man", "my sister", "a young girl", "the teacher", "our neighbour", "the little boy",
            "his mother", "the doctor", "a tall woman", "the farmer", "my best friend", "the driver",
            "her brother", "the captain", "a quiet child", "the baker", "your father", "the singer",
            "we", "they", "i", "you", "she", "he"]
VERBS = ["found", "lost", "painted", "carried", "opened", "cleaned", "bought", "sold", "watched", "fixed",
         "wanted", "dropped", "forgot", "noticed", "moved", "liked", "hid", "washed", "counted", "brought"]
ADJECTIVES = ["small", "heavy", "bright", "broken", "yellow", "wooden", "strange", "warm", "empty", "green",
              "quiet", "dusty", "shiny", "round", "soft", "cold", "golden", "tiny", "narrow", "ancient"]
NOUNS = ["box", "letter", "window", "basket", "chair", "lamp", "bottle", "blanket", "map", "kettle",
         "bicycle", "garden", "candle", "mirror", "ladder", "jacket", "bucket", "picture", "drum", "clock"]
PLACES = ["near the river", "in the kitchen", "behind the house", "at the station", "on the hill",
          "under the bridge", "by the window", "in the market", "at the harbour", "across the street",
          "in the forest", "on the beach", "at the school", "inside the barn", "along the road"]
TIMES = ["this morning", "last winter", "every evening", "after lunch", "before dawn", "on monday",
         "at midnight", "in the spring", "yesterday", "late at night", "during the storm", "once again"]
QUESTIONS = ["where", "why", "when", "how"]
AUX = ["did", "would", "could", "should"]
BASE_VERBS = ["find", "lose", "paint", "carry", "open", "clean", "buy", "sell", "watch", "fix", "move", "hide"]


def _sentence(rng):
    form = rng.randrange(5)
    obj = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    if form == 0:
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {obj} {rng.choice(PLACES)}."
    elif form == 1:
        text = f"{rng.choice(TIMES)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} " \
               f"{rng.choice(NOUNS)}."
    elif form == 2:
        subj = rng.choice(["you", "they", "we", "she", "he"])
        text = f"{rng.choice(QUESTIONS)} {rng.choice(AUX)} {subj} {rng.choice(BASE_VERBS)} {obj}?"
    elif form == 3:
        text = f"{obj} {rng.choice(PLACES)} is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}."
    else:
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {obj} {rng.choice(TIMES)}, " \
               f"then {rng.choice(VERBS)} it {rng.choice(PLACES)}."
    # sentence case, and the pronoun I capitalised
    text = " ".join("I" if w == "i" else w for w in text.split(" "))
    return text[0].upper() + text[1:]


def generated_sentences(seed, n):
    """``n`` sentences from the grammar, deterministic from ``seed`` (duplicates are possible and kept)."""
    rng = random.Random(f"{seed}-synthetic-text")
    return [_sentence(rng) for _ in range(n)]
