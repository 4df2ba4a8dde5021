"""lobes.safetensors_io: the one reader of task vectors (task_vector.load_task_vector), low-rank caches
(low_rank.load_factored) and safetensors checkpoints (checkpoint_import): every defect is a DataError naming the
file and what is wrong, the same for the three callers."""
import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from lobes.adaltm import checkpoint_import, low_rank
from lobes.adaltm.task_vector import compute_task_vector, load_task_vector, save_task_vector
from lobes.errors import DataError
from lobes.safetensors_io import read_safetensors

KEYS = ("encoder.layers.0.fc.weight", "encoder.layers.0.fc.bias")


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {KEYS[0]: torch.randn(4, 6, generator=g), KEYS[1]: torch.randn(4, generator=g)}


@pytest.fixture
def files(tmp_path):
    """{caller: (a valid file, the caller's reader)} for the three callers."""
    vector = save_task_vector(compute_task_vector(_state(0), _state(1), "SER"), tmp_path / "ser.safetensors")
    cache = low_rank.save_factored(low_rank.factorize("SER", load_task_vector(vector).delta, 2),
                                   tmp_path / "ser.r2.lowrank.safetensors")
    ckpt = tmp_path / "model.safetensors"
    save_file(_state(0), str(ckpt))
    return {"task_vector": (vector, load_task_vector), "low_rank": (cache, low_rank.load_factored),
            "checkpoint": (ckpt, checkpoint_import._read_safetensors)}


def _header_len(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _rewrite(path, tensors=None, metadata=None):
    """Rewrite ``path`` with some of its tensors / metadata changed (None keeps them)."""
    old, meta = read_safetensors(path)
    save_file(tensors if tensors is not None else old, str(path), metadata=metadata if metadata is not None else meta)


def test_a_valid_file_reads_back_exactly(files):
    path, _ = files["task_vector"]
    tensors, meta = read_safetensors(path, "task vector file")
    tv = load_task_vector(path)
    assert sorted(tensors) == sorted(KEYS) and meta == tv.metadata and meta["format"] == "adaltm-task-vector"
    want = _state(1)[KEYS[0]] - _state(0)[KEYS[0]]
    assert torch.equal(tensors[KEYS[0]], want) and torch.equal(tv.delta[KEYS[0]], want)
    fv = low_rank.load_factored(files["low_rank"][0])
    assert fv.rank(KEYS[0]) == 2 and fv.shapes == {KEYS[0]: (4, 6)} and torch.equal(fv.dense[KEYS[1]], tv.delta[KEYS[1]])


@pytest.mark.parametrize("caller", ["task_vector", "low_rank", "checkpoint"])
def test_a_missing_file_is_named_as_not_found(files, caller, tmp_path):
    """Old code: low_rank said 'cannot read low-rank task vector: No such file ...', checkpoint_import 'cannot read
    safetensors file (truncated or corrupt?)' for a file that is not there."""
    _, read = files[caller]
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(DataError, match=re.escape(str(missing)) + r": (task vector file|low-rank task vector|"
                                                                  r"checkpoint file) not found$"):
        read(missing)


@pytest.mark.parametrize("caller", ["task_vector", "low_rank", "checkpoint"])
def test_truncated_data_says_how_much_is_missing(files, caller):
    path, read = files[caller]
    data = path.read_bytes()
    declared = len(data) - 8 - _header_len(path)
    path.write_bytes(data[:-10])  # a copy cut short: the header is whole, the last tensor is not
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + r".* is truncated: its header declares "
                       + f"{declared} bytes of tensor data, the file holds {declared - 10}$"):
        read(path)


@pytest.mark.parametrize("caller", ["task_vector", "low_rank", "checkpoint"])
def test_invalid_headers_are_named(files, caller):
    path, read = files[caller]
    data = path.read_bytes()
    path.write_bytes(data[:40])  # cut inside the header
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + r".* is truncated or not a safetensors file: its "
                       + f"header length says {_header_len(path)} bytes, the file holds 32 after it$"):
        read(path)
    path.write_bytes(data[:5])
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + r".* \(5 bytes, fewer than the 8-byte header length\)"):
        read(path)
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:8] + b"{" * n + data[8 + n:])  # right lengths, header not JSON
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + r".* has an invalid header \(not safetensors JSON"):
        read(path)


def test_a_wrong_dtype_is_refused_naming_the_tensor(files):
    """Old code read a float16 low-rank factor without a word, and refused an integer ΔW only as a fingerprint
    mismatch."""
    cache, _ = files["low_rank"]
    tensors, _ = read_safetensors(cache)
    _rewrite(cache, {**tensors, KEYS[0] + "::U": tensors[KEYS[0] + "::U"].half()})
    with pytest.raises(DataError, match=re.escape(f"{cache}: low-rank task vector holds tensors of a wrong dtype, "
                                                  f"['{KEYS[0]}::U (torch.float16)']; expected ['torch.float32']")):
        low_rank.load_factored(cache)
    vector, _ = files["task_vector"]
    tensors, _ = read_safetensors(vector)
    _rewrite(vector, {**tensors, KEYS[1]: torch.arange(4)})
    with pytest.raises(DataError, match=re.escape(f"{vector}: task vector file holds tensors of a wrong dtype, "
                                                  f"['{KEYS[1]} (torch.int64)']")):
        load_task_vector(vector)


def test_a_missing_metadata_key_is_named_and_a_cache_without_it_is_rebuilt(files, caplog):
    """Old code: load_factored raised KeyError('shapes'), and cached_factored crashed on such a cache instead of
    rebuilding it."""
    vector, _ = files["task_vector"]
    cache = low_rank.cache_path(vector, 2)
    _, meta = read_safetensors(cache)
    _rewrite(cache, metadata={k: v for k, v in meta.items() if k != "shapes"})
    with pytest.raises(DataError, match=re.escape(f"{cache}: low-rank task vector metadata lacks ['shapes']")):
        low_rank.load_factored(cache)
    fv = low_rank.cached_factored(vector, 2)  # rebuilt from the vector, not a crash
    assert fv.shapes == {KEYS[0]: (4, 6)} and json.loads(read_safetensors(cache)[1]["shapes"]) == {KEYS[0]: [4, 6]}
    _, meta = read_safetensors(vector)
    _rewrite(vector, metadata={k: v for k, v in meta.items() if k not in ("fingerprint", "key_hash")})
    with pytest.raises(DataError, match=re.escape(f"{vector}: task vector file metadata lacks ['fingerprint', "
                                                  "'key_hash']")):
        load_task_vector(vector)
    _rewrite(vector, metadata={**meta, "format": "something-else"})
    with pytest.raises(DataError, match=re.escape(f"{vector}: not a task vector file (metadata format="
                                                  "'something-else', expected 'adaltm-task-vector')")):
        load_task_vector(vector)


def test_a_header_length_over_the_limit_is_refused_before_reading(tmp_path):
    """A large file of another format whose first 8 bytes read as a 150 MB header length: refused from the length,
    as safetensors refuses it (limit 100 MB), without reading the 150 MB. Old code read them into RAM and then said
    'invalid header (not safetensors JSON ...)'."""
    import tracemalloc

    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(160_000_000)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=re.escape(f"{path}: checkpoint file is not a safetensors file: its header "
                                                      "length says 150000000 bytes, over safetensors' limit of "
                                                      "100000000")):
            checkpoint_import._read_safetensors(path)
        assert tracemalloc.get_traced_memory()[1] < 10_000_000
    finally:
        tracemalloc.stop()


def test_malformed_data_offsets_are_a_data_error(tmp_path):
    """Old code: ``int(e["data_offsets"][1])`` raised a bare ValueError / TypeError naming no file."""
    path = tmp_path / "x.safetensors"
    for offsets in ('"ab"', "4", "[0]"):
        header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": %s}}' % offsets).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        with pytest.raises(DataError, match=re.escape(f"{path}: checkpoint file has an invalid header") + r".*\['w'\]"):
            checkpoint_import._read_safetensors(path)
