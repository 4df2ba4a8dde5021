"""Reading corpus text files (transcripts, label files) as UTF-8, with a listed cp1252 fallback per line.

Corpora are UTF-8 in principle, but a file edited on Windows can hold a single cp1252 / Latin-1 byte
(``caf\\xe9``). Decoding with ``errors="replace"`` would turn it into U+FFFD, which the CTC normaliser then
drops (``CAF``): silently wrong text. Here a line that is not valid UTF-8 is decoded as cp1252 instead (``café``,
then ``CAFE`` after normalisation), and the (file, line) is remembered so that the prepare script logs the count
and writes the list. A line that is neither UTF-8 nor cp1252 (cp1252 leaves 5 bytes undefined) raises
``DataError`` naming the file and line. Lines are split as Python's text mode does (``\\n``, ``\\r\\n``, ``\\r``),
on the bytes: those are single ASCII bytes in both encodings, so a line never straddles two encodings.
"""
from pathlib import Path

from lobes.errors import DataError
from lobes.io_utils import atomic_write

FALLBACK_ENCODING = "cp1252"
FALLBACK_FILE = "cp1252_fallback.txt"


def _split_lines(data):
    """Byte lines as Python's text mode splits them (universal newlines), without their line ends."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


def not_utf8_error(path):
    """A ``DataError`` naming the first line of ``path`` that is not UTF-8, for files read strictly (label CSVs,
    whose fields are names and codes: a stray byte there is a damaged file, not text to recover)."""
    for line_no, raw in enumerate(_split_lines(Path(path).read_bytes()), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return DataError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start} of the line)")
    return DataError(f"{path}: not UTF-8")


class TextReader:
    """Decodes text files line by line (UTF-8, else cp1252) and records every line that needed cp1252.

    One reader per preparation run: ``lines`` / ``text`` read the files, ``write_report`` then writes
    ``<save_folder>/cp1252_fallback.txt`` (``file<TAB>line``, header first, written even when empty so that a
    stale list never survives) and prints the count when there is one.
    """

    def __init__(self):
        self.fallbacks = []  # (path, 1-based line number)

    def lines(self, path):
        """``[(line_no, text)]`` of ``path`` without line ends (no empty last entry after a final newline)."""
        raw_lines = _split_lines(Path(path).read_bytes())
        if raw_lines[-1] == b"":
            raw_lines.pop()
        return [(no, self._decode(raw, path, no)) for no, raw in enumerate(raw_lines, start=1)]

    def text(self, path):
        """The whole file as one string (line ends as text mode gives them: ``\\n``)."""
        raw_lines = _split_lines(Path(path).read_bytes())
        return "\n".join(self._decode(raw, path, no) for no, raw in enumerate(raw_lines, start=1))

    def _decode(self, raw, path, line_no):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as utf8_error:
            try:
                text = raw.decode(FALLBACK_ENCODING)
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: neither UTF-8 ({utf8_error.reason} at byte "
                                f"{utf8_error.start} of the line) nor {FALLBACK_ENCODING}") from None
            self.fallbacks.append((str(path), line_no))
            return text

    def write_report(self, save_folder):
        """Write the list of lines decoded as cp1252 and print their count (if any); returns the list's path."""
        path = Path(save_folder) / FALLBACK_FILE
        with atomic_write(path, encoding="utf-8") as f:
            f.write("file\tline\n")
            f.writelines(f"{file}\t{line_no}\n" for file, line_no in self.fallbacks)
        if self.fallbacks:
            n_files = len({file for file, _ in self.fallbacks})
            print(f"  {len(self.fallbacks)} line(s) in {n_files} file(s) were not UTF-8 and were decoded as "
                  f"{FALLBACK_ENCODING}; listed in {path}")
        return path
