"""One reader (and writer) for the toolkit's safetensors files: task vectors, low-rank caches, checkpoints, speech
modules.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor: ``dtype``, ``shape``,
``data_offsets`` into the data that follows; ``__metadata__``: string pairs) and the tensor bytes. It holds no
code, so reading one executes nothing: the guarantee ``torch.load(weights_only=True)`` gives for pickles, by
construction. :func:`read_safetensors` checks that layout itself before safetensors maps the file, so each defect
is a :class:`lobes.errors.DataError` naming the file and what is wrong (safetensors' own messages, e.g. "header
too large", name neither): a missing file, a header cut short or not JSON, tensor data shorter than the header
declares (a truncated copy), a tensor of a dtype the caller does not take, a missing metadata key or ``format``.
"""
import json
import struct
from pathlib import Path

from lobes.errors import DataError
from lobes.io_utils import atomic_path

_LEN_BYTES = 8
# safetensors' own limit (MAX_HEADER_SIZE): a length above it is not a header, and reading it would pull up to the
# whole of a large file of another format (a renamed .bin) into RAM before the JSON parse fails
MAX_HEADER_BYTES = 100_000_000
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def _header(path, what):
    """(tensor entries {name: {dtype, shape, data_offsets}}, metadata {str: str}) of ``path``, layout checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(_LEN_BYTES)
        if len(raw_len) < _LEN_BYTES:
            raise DataError(f"{path}: {what} is truncated or not a safetensors file ({size} bytes, fewer than "
                            f"the {_LEN_BYTES}-byte header length)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - _LEN_BYTES:
            raise DataError(f"{path}: {what} is truncated or not a safetensors file: its header length says {n} "
                            f"bytes, the file holds {size - _LEN_BYTES} after it")
        if n > MAX_HEADER_BYTES:
            raise DataError(f"{path}: {what} is not a safetensors file: its header length says {n} bytes, over "
                            f"safetensors' limit of {MAX_HEADER_BYTES}")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: {what} has an invalid header (not safetensors JSON: {e})") from e
    if not isinstance(header, dict):
        raise DataError(f"{path}: {what} has an invalid header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    bad = [k for k, e in header.items() if not isinstance(e, dict) or any(x not in e for x in _ENTRY_KEYS)
           or not _offsets_ok(e["data_offsets"])]
    if bad or not isinstance(meta, dict):
        raise DataError(f"{path}: {what} has an invalid header (entries without {list(_ENTRY_KEYS)} or with "
                        f"data_offsets other than [begin, end]: {bad[:5]})")
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    held = size - _LEN_BYTES - n
    if held != end:
        raise DataError(f"{path}: {what} is truncated: its header declares {end} bytes of tensor data, the file "
                        f"holds {held}" if held < end else
                        f"{path}: {what} has {held - end} bytes after the {end} its header declares")
    return header, meta


def _offsets_ok(offsets):
    return (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1])


def read_safetensors(path, what="safetensors file", dtypes=None, metadata_keys=(), file_format=None):
    """(tensors {name: CPU tensor}, metadata {str: str}) of the safetensors file ``path``.

    ``what`` names the file's role in messages ("task vector file"); ``dtypes``: the torch dtypes its tensors may
    have (None: any); ``metadata_keys``: keys its metadata must hold; ``file_format``: the metadata ``format`` it
    must declare. Every defect is a DataError naming ``path`` (module doc)."""
    from safetensors import safe_open

    _, meta = _header(path, what)
    if file_format is not None and meta.get("format") != file_format:
        raise DataError(f"{path}: not a {what} (metadata format={meta.get('format')!r}, expected {file_format!r})")
    missing = [k for k in metadata_keys if k not in meta]
    if missing:
        raise DataError(f"{path}: {what} metadata lacks {missing}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError on what the layout check cannot see (e.g. an unknown dtype)
        raise DataError(f"{path}: cannot read {what}: {e}") from e
    if dtypes is not None:
        wrong = sorted(f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in dtypes)
        if wrong:
            raise DataError(f"{path}: {what} holds tensors of a wrong dtype, {wrong[:5]}"
                            + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
                            + f"; expected {sorted(str(d) for d in dtypes)}")
    return tensors, dict(meta)


def write_safetensors(tensors, path, metadata=None):
    """safetensors ``save_file`` through a temp file renamed into place (:func:`lobes.io_utils.atomic_path`)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path
