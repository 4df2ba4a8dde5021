"""One exception type for bad user input, so recipes can report it without a traceback maze."""


class DataError(ValueError):
    """Bad input data or model file; the message always names the file, key or utterance."""
