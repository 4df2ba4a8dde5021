"""What a feature cache's hidden states depend on, by content: a reused cache must be the features this run would compute.

The identity (stored in the cache's ``index.json``, compared before a cache is reused) holds

- the **base weights**: SHA-256 of every weight / config file of ``wavlm_source`` (a local directory, or the
  snapshot of a hub id in the Hugging Face cache); the in-memory W_base when no file can be found;
- **each task vector**: SHA-256 of its safetensors file, or of its tensors when it was given in memory;
- **λ** (exact floats), the merge implementation, ΔW's storage dtype (``delta_dtype`` rounds ΔW) and its
  truncation (``delta_rank``);
- the input **normalisation** (``normalize_wav``);
- for a pooled cache, the **head** it was checked against (its entries are exact only for a ``pooled_linear``
  head with mean pooling; a frame-level entry does not depend on the head at all).

Per-utterance durations are stored beside the index (``feature_cache.py``), so a re-prepared manifest with other
segments or duration limits under the same ids is not read from an old cache either.

Hashing streams each file (``hashlib.file_digest``): the 1.2 GB of WavLM-Large are read once, never loaded a second
time as tensors. The digest of a file is memoised in ``<feature_cache_dir>/content_hashes.json`` under its resolved
path with its size and mtime: a later run re-reads a file only when one of them changed (a rewrite in place that
keeps both, e.g. ``cp -p`` of other content of the same size, is the one case the memo cannot see).
"""
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from lobes.io_utils import atomic_write

logger = logging.getLogger(__name__)

HASH_MEMO = "content_hashes.json"
# what WavLMModel.from_pretrained reads: the config and the weights (single or sharded, safetensors or pickle)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
LABELS = {"base": "base weights", "task_vectors": "task vector", "lambda": "λ", "merge": "merge",
          "normalize_wav": "normalisation (normalize_wav)", "head": "head", "dtype": "cache_dtype",
          "pooled": "feature_cache_pooled", "num_hidden": "number of hidden states", "hidden_size": "hidden size"}


def load_memo(cache_dir):
    """The memoised file digests of ``cache_dir`` ({} when there are none or the memo is unreadable)."""
    path = Path(cache_dir) / HASH_MEMO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("feature cache hash memo '%s' unreadable (%s): files are hashed again", path, e)
        return {}


def save_memo(cache_dir, memo):
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(cache_dir) / HASH_MEMO) as f:
        json.dump(memo, f, indent=1, sort_keys=True)


def file_sha256(path, memo):
    """SHA-256 of a file's bytes, streamed; reused from ``memo`` while the file's size and mtime are unchanged."""
    real = Path(path).resolve()  # Hugging Face snapshots are symlinks into blobs/
    st = real.stat()
    seen = memo.get(str(real))
    if seen and seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
        return seen["sha256"]
    with open(real, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def tensors_sha256(tensors):
    """SHA-256 over {name: tensor} (names sorted; name, dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_folder(source):
    """The folder holding a WavLM's files: ``source`` itself, or a hub id's snapshot in the HF cache (or None)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(str(source), "config.json")
    except Exception:  # not a valid repo id: no snapshot to find
        return None
    return Path(config).parent if isinstance(config, (str, os.PathLike)) else None


def base_digest(wavlm, memo):
    """{file name: SHA-256} of the base model's config and weight files, or the in-memory W_base's digest."""
    folder = source_folder(wavlm.source)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
                   ) if folder is not None else []
    if any(p.suffix in WEIGHT_SUFFIXES for p in files):
        return {p.name: file_sha256(p, memo) for p in files}
    logger.info("feature cache: no weight files found for '%s'; hashing W_base in memory", wavlm.source)
    stored = getattr(wavlm, "base_weights", None)  # materialized merge: the model's own weights become W_merged
    state = {k: stored[k.replace(".", "__")] if stored is not None else wavlm.base_parameter(k) for k in wavlm.keys}
    return {"in_memory": tensors_sha256(state)}


def cache_identity(wavlm, task_vectors=None, head=None, memo=None):
    """Everything the cached hidden states of ``wavlm`` depend on (see the module docstring).

    task_vectors: the recipe's {name: path} (``task_vectors`` in the YAML); a vector without a path is hashed from
    the tensors ``wavlm`` holds. head: the SER head, given for a pooled cache only. memo: {path: digest} memo."""
    memo = {} if memo is None else memo
    ident = {"base": base_digest(wavlm, memo), "normalize_wav": bool(wavlm.normalize_wav)}
    if wavlm.num_vectors:
        paths = dict(task_vectors or {})
        names = list(wavlm.lambdas.vector_names)
        ident["task_vectors"] = {}
        for row, name in enumerate(names):
            path = paths.get(name)
            if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
                ident["task_vectors"][name] = file_sha256(path, memo)
            else:
                ident["task_vectors"][name] = tensors_sha256(dict(wavlm.deltas[row]))
        ident["lambda"] = {k: [float(x) for x in v] for k, v in wavlm.coefficients().items()}
        delta_dtype = next(iter(wavlm.deltas[0].values())).dtype
        ident["merge"] = {"impl": wavlm.merge_impl, "delta_dtype": str(delta_dtype).replace("torch.", ""),
                          "delta_rank": wavlm.delta_rank}  # the truncation changes the merged weights
    if head is not None:
        ident["head"] = {"type": head.head_type, "pooling": head.pooling}
    return ident


def describe_change(old, new, path=()):
    """Readable differences between two identities/specs, e.g. ``["task vector ASR changed", "λ changed"]``."""
    if isinstance(old, dict) and isinstance(new, dict) and path[:1] != ("lambda",):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            if key not in new or key not in old:
                what = LABELS.get(key, key) if not path else f"{LABELS.get(path[0], path[0])} {key}"
                out.append(f"{what} {'removed' if key not in new else 'added'}")
            elif old[key] != new[key]:
                out += describe_change(old[key], new[key], path + (key,))
        return out
    if not path:
        return ["changed"] if old != new else []
    head = LABELS.get(path[0], path[0])
    detail = " ".join(str(p) for p in path[1:])
    if path[0] == "base" and detail:
        detail = f"({detail})"
    return [f"{head}{' ' + detail if detail else ''} changed"]
