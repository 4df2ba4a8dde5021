"""The 8-class MSP-Podcast emotion inventory and the label spellings used by its files.

Order is alphabetical, the same as the vox-profile SER checkpoint's head (minus its 'Other').
"""

EMOTIONS = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
EMOTION_TO_INDEX = {e: i for i, e in enumerate(EMOTIONS)}

# labels_consensus.csv EmoClass letters. O (other) and X (no agreement) are not part of the 8-class task.
LETTER_TO_EMOTION = {
    "A": "Anger", "C": "Contempt", "D": "Disgust", "F": "Fear",
    "H": "Happiness", "N": "Neutral", "S": "Sadness", "U": "Surprise",
}
DROPPED_LETTERS = {"O", "X"}

# Primary-emotion words used by annotators in labels_detailed.csv (v1.11 EmoDetail and newer EmoClass_Major).
# Votes for 'Other...' are not one of the 8 classes and are ignored when building soft labels.
WORD_TO_EMOTION = {
    "angry": "Anger", "anger": "Anger",
    "contempt": "Contempt",
    "disgust": "Disgust", "disgusted": "Disgust",
    "fear": "Fear", "afraid": "Fear",
    "happy": "Happiness", "happiness": "Happiness",
    "neutral": "Neutral",
    "sad": "Sadness", "sadness": "Sadness",
    "surprise": "Surprise", "surprised": "Surprise",
}
