"""Sentence banks of the synthetic mini corpora (tools/make_mini_corpora.py; the design table is in its docstring).

Every sentence is mixed case with punctuation; after lobes.ctc_text.normalize_transcript it is upper-case letters,
apostrophes and spaces only. No digits, abbreviations or interjections: espeak-ng must speak exactly the words the
transcript contains. The vocabulary is kept small (words recur across sentences) so that a tiny character-CTC model
hears every word many times.

``POOLS`` are the building blocks of the mini MSP-Podcast banks; ``CLASS_POOLS`` says which pools each consensus
letter draws from, so two classes share sentences exactly where they share a pool. ``LIBRI`` is the neutral,
emotion-free text of mini LibriSpeech and shares no sentence with any pool.
"""

POOLS = {
    # Spoken by all eight classes: the partial overlap every pair of banks has.
    "common": [
        "I need to tell you something.",
        "Look at this.",
    ],
    # Hostile blame: Anger and Contempt (told apart by prosody only).
    "blame": [
        "You never listen to me!",
        "This is your fault again.",
        "Stop telling me what to do.",
        "You always get it wrong.",
        "I told you so many times.",
        "Nobody asked you to do this.",
    ],
    # Revulsion: Disgust only.
    "disgust": [
        "That smell is making me sick.",
        "This food tastes rotten.",
        "Get that dirty thing away from me.",
        "The floor is covered in slime.",
        "I can't eat this, it's gross.",
        "There is hair in my soup.",
    ],
    # Threat: Fear only.
    "fear": [
        "Someone is outside the door.",
        "Please don't hurt me.",
        "I heard a noise in the dark.",
        "We have to hide right now.",
        "What if they find us here?",
        "I am too scared to move.",
    ],
    # Good news: Happiness and Surprise (told apart by prosody only).
    "news": [
        "We won the big prize!",
        "You got the job!",
        "She said yes!",
        "I can't believe it, this is amazing!",
        "Look, it's snowing outside!",
        "My sister is having a baby!",
    ],
    # Flat statements of fact: Neutral and Sadness (told apart by prosody only).
    "plain": [
        "The train leaves at noon.",
        "I stayed home all day.",
        "The shop is closed now.",
        "He moved to another city.",
        "The letter came this morning.",
        "We sold the old house.",
    ],
}

CLASS_POOLS = {
    "A": ("blame", "common"),
    "C": ("blame", "common"),
    "D": ("disgust", "common"),
    "F": ("fear", "common"),
    "H": ("news", "common"),
    "N": ("plain", "common"),
    "S": ("plain", "common"),
    "U": ("news", "common"),
    # Rows that prepare drops (no agreement / other): any sentence.
    "O": tuple(POOLS),
    "X": tuple(POOLS),
}

# Neutral narrative for mini LibriSpeech: no emotion words, no exclamations or questions.
LIBRI = [
    "The river runs past the old mill.",
    "He opened the window and looked out.",
    "The road turned north after the hill.",
    "She put the book back on the shelf.",
    "The farmer walked to the market.",
    "A small boat lay near the shore.",
    "They sat by the fire after supper.",
    "The old man lived in a stone house.",
    "The children walked to school by the lake.",
    "He wrote a letter to his brother.",
    "The wind moved through the tall grass.",
    "She carried water from the well.",
    "The ship sailed at first light.",
    "Snow covered the fields in winter.",
    "The door of the barn was open.",
    "His brother lived near the river.",
]


def class_bank(letter):
    """Sentences of one consensus letter's bank, in a fixed order (pool order, then sentence order)."""
    return [s for pool in CLASS_POOLS[letter] for s in POOLS[pool]]


def all_sentences():
    """Every sentence of the MSP pools and of LIBRI, each once (e.g. text for a tiny LM)."""
    return [s for pool in POOLS.values() for s in pool] + list(LIBRI)
