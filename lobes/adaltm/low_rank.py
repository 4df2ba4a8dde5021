"""Low-rank task vectors: ΔW ≈ U Vᵀ per weight matrix (truncated SVD), cached beside the task vector file.

``delta_rank`` (AdaLTM YAML) says how much of each ΔW is kept:

- ``null``: nothing is truncated (the paper's setting, full-rank ΔW);
- an int r ≥ 1: rank min(r, full rank) per matrix;
- a float in (0, 1): the smallest rank whose singular values hold that fraction of the matrix's squared
  Frobenius norm ("energy"), e.g. 0.9.

A weight of 2 or more dimensions is seen as a matrix [out, in·k] (conv kernels reshaped, as the conv's GEMM sees
them); vectors (biases, norm scales, ``masked_spec_embed``) and matrices with a dimension of 1 stay dense, exact.
U carries the singular values (U = U_svd·S), V = V_svd, so ΔW ≈ (U @ V.T).view(shape).

A task vector whose source was LoRA keeps its LoRA factors for the LoRA-trained weights (``TaskVector.factors``,
written by the importer): U = B·scaling, V = Aᵀ, so U Vᵀ is ΔW exactly, whatever ``delta_rank`` says (no truncation error), and
the other weights are truncated as usual.

Cache: ``<vector>.rank-<spec>.lowrank.safetensors`` beside the vector file, with metadata ``source_sha256`` (a
content hash of the vector file) and ``rank_spec``; a cache whose hash or spec differs is rebuilt (logged).
"""
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lobes.errors import DataError
from lobes.safetensors_io import read_safetensors, write_safetensors

logger = logging.getLogger(__name__)

FORMAT = "adaltm-lowrank-vector"
FORMAT_VERSION = "1"
_U, _V = "::U", "::V"


def check_rank_spec(spec):
    """``delta_rank``: None, an int ≥ 1 or a float in (0, 1); anything else is a clear error."""
    if spec is None:
        return None
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise DataError(f"delta_rank {spec!r} is not null, an integer rank or an energy fraction in (0, 1)")
    if isinstance(spec, int):
        if spec < 1:
            raise DataError(f"delta_rank {spec} is not a rank ≥ 1")
        return spec
    if not 0.0 < spec < 1.0:
        raise DataError(f"delta_rank {spec} is a float but not an energy fraction in (0, 1)")
    return float(spec)


def spec_tag(spec):
    """File-name tag of a rank spec: ``r32`` or ``e0.9``."""
    return f"r{spec}" if isinstance(spec, int) else f"e{spec:g}"


def is_matrix(t):
    """Whether ΔW of this shape is truncated: ≥ 2 dims, and [out, rest] has no dimension of 1."""
    return t.dim() >= 2 and t.shape[0] > 1 and t[0].numel() > 1


def rank_for(singular_values, spec):
    """The rank ``spec`` keeps of a matrix with these singular values (descending); 0 for a zero matrix."""
    s = singular_values.double()
    # numerical rank at float32 precision (the factors are stored in float32), as torch.linalg.matrix_rank
    s = s[s > s.max() * max(len(s), 1) * torch.finfo(torch.float32).eps] if len(s) else s
    s2 = s.pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 0
    if isinstance(spec, int):
        return min(spec, len(s2))
    captured = torch.cumsum(s2, 0) / total
    # smallest r with captured[r-1] ≥ spec (float rounding: a fraction a hair under 1 still counts)
    return min(int((captured < spec - 1e-12).sum()) + 1, len(s2))


def truncate_matrix(delta, spec):
    """(U [out, r], V [in·k, r]) of ΔW's best rank-r approximation (Eckart-Young), in float32."""
    m = delta.reshape(delta.shape[0], -1).double()  # float64 SVD: the kept factors are exact to float32
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = rank_for(s, spec)
    return (u[:, :r] * s[:r]).float().contiguous(), vh[:r].T.float().contiguous()


@dataclass
class FactoredVector:
    """A task vector with its matrices as factors: ``factors`` {key: (U, V)}, ``dense`` {key: ΔW}."""

    name: str
    dense: dict
    factors: dict
    shapes: dict = field(default_factory=dict)   # {factored key: ΔW's shape}
    metadata: dict = field(default_factory=dict)

    def keys(self):
        return sorted(set(self.dense) | set(self.factors))

    def delta(self, key):
        """ΔW of one key as a dense tensor (U Vᵀ reshaped for a factored key)."""
        if key in self.dense:
            return self.dense[key]
        u, v = self.factors[key]
        return (u @ v.T).view(self.shapes[key])

    def to_dense(self):
        return {k: self.delta(k) for k in self.keys()}

    def rank(self, key):
        return self.factors[key][0].shape[1] if key in self.factors else None

    def num_params(self):
        return (sum(t.numel() for t in self.dense.values())
                + sum(u.numel() + v.numel() for u, v in self.factors.values()))


def factorize(name, delta, spec, exact_factors=None, metadata=None):
    """Truncate every matrix of ``delta`` ({key: ΔW}) to ``spec``; ``exact_factors`` {key: (U, V)} (LoRA) are
    kept as given, exact."""
    spec = check_rank_spec(spec)
    if spec is None:
        raise DataError(f"task vector '{name}': factorize needs a delta_rank (null means: keep ΔW dense)")
    exact_factors = exact_factors or {}
    dense, factors, shapes = {}, {}, {}
    for key, t in delta.items():
        if key in exact_factors:
            u, v = exact_factors[key]
            if u.shape[0] != t.shape[0] or v.shape[0] != t[0].numel() or u.shape[1] != v.shape[1]:
                raise DataError(f"task vector '{name}': factors of '{key}' {tuple(u.shape)}, {tuple(v.shape)} "
                                f"do not fit ΔW {tuple(t.shape)}")
            factors[key], shapes[key] = (u.float().contiguous(), v.float().contiguous()), tuple(t.shape)
        elif is_matrix(t):
            factors[key], shapes[key] = truncate_matrix(t, spec), tuple(t.shape)
        else:
            dense[key] = t.float().contiguous()
    meta = dict(metadata or {})
    meta.update(rank_spec=spec_tag(spec), exact_keys=json.dumps(sorted(exact_factors)))
    return FactoredVector(name=name, dense=dense, factors=factors, shapes=shapes, metadata=meta)


def energy_captured(delta, ranks):
    """{rank: fraction of Σ ||ΔW||² over the matrices of ``delta`` that the best rank-r factors keep}."""
    total, kept = 0.0, {r: 0.0 for r in ranks}
    for t in delta.values():
        if not is_matrix(t):
            continue
        s2 = torch.linalg.svdvals(t.reshape(t.shape[0], -1).double()).pow(2)
        total += float(s2.sum())
        csum = torch.cumsum(s2, 0)
        for r in ranks:
            kept[r] += float(csum[min(r, len(s2)) - 1])
    return {r: (kept[r] / total if total else 1.0) for r in ranks}


# ---------------------------------------------------------------------------------------------------- disk
def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_path(vector_path, spec):
    p = Path(vector_path)
    return p.with_name(f"{p.stem}.{spec_tag(spec)}.lowrank.safetensors")


def save_factored(fv, path):
    tensors = {k: t.contiguous() for k, t in fv.dense.items()}
    for k, (u, v) in fv.factors.items():
        tensors[k + _U], tensors[k + _V] = u.contiguous(), v.contiguous()
    meta = {**fv.metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "name": fv.name,
            "shapes": json.dumps({k: list(s) for k, s in fv.shapes.items()})}
    write_safetensors(tensors, path, meta)
    fv.metadata = meta
    return path


def load_factored(path):
    """A cache written by :func:`save_factored` (float32 factors and dense ΔW); DataError naming the file on any
    defect, also a factored key without its U or V."""
    tensors, meta = read_safetensors(path, "low-rank task vector", dtypes=(torch.float32,), file_format=FORMAT,
                                     metadata_keys=("name", "shapes", "rank_spec"))
    try:
        shapes = {k: tuple(s) for k, s in json.loads(meta["shapes"]).items()}
        factors = {k: (tensors.pop(k + _U), tensors.pop(k + _V)) for k in shapes}
    except (ValueError, AttributeError, TypeError, KeyError) as e:
        raise DataError(f"{path}: low-rank task vector metadata 'shapes' does not match its tensors ({e!r})") from e
    return FactoredVector(name=meta["name"], dense=tensors, factors=factors, shapes=shapes, metadata=meta)


def cached_factored(vector_path, spec):
    """The factored form of the task vector file ``vector_path`` at ``spec``, from its cache when the cache was
    built from the same file content and spec, else (re)built, saved and logged."""
    from lobes.adaltm.task_vector import load_task_vector

    spec = check_rank_spec(spec)
    cache = cache_path(vector_path, spec)
    digest = file_sha256(vector_path)
    if cache.exists():
        try:
            fv = load_factored(cache)
            why = None if fv.metadata.get("source_sha256") == digest else "its task vector file changed"
            if why is None and fv.metadata.get("rank_spec") != spec_tag(spec):
                why = f"rank spec {fv.metadata.get('rank_spec')} != {spec_tag(spec)}"
        except DataError as e:
            why = str(e)
        if why is None:
            return fv
        logger.info("rebuilding low-rank cache %s: %s", cache, why)
    tv = load_task_vector(vector_path)
    fv = factorize(tv.name, tv.delta, spec, exact_factors=tv.factors,
                   metadata={"source": str(vector_path), "source_sha256": digest,
                             "source_fingerprint": tv.metadata.get("fingerprint", "")})
    save_factored(fv, cache)
    logger.info("low-rank cache %s: %d factored matrices (%s), %d dense keys", cache, len(fv.factors),
                spec_tag(spec), len(fv.dense))
    return fv


def resolve_factored(name, vec, spec):
    """A path (cached), a TaskVector or a {key: ΔW} dict -> FactoredVector at ``spec``."""
    if isinstance(vec, FactoredVector):
        return vec
    if isinstance(vec, dict):
        return factorize(name, vec, spec)
    if hasattr(vec, "delta"):
        return factorize(name, vec.delta, spec, exact_factors=getattr(vec, "factors", None))
    return cached_factored(vec, spec)


def merge_inputs(name, vec, spec, keep_factors, factor_lists, dtype, check):
    """MergedWavLM's loader with ``delta_rank``: the truncated vector, shape-checked by ``check`` ({key: tensor}
    -> raises). ``keep_factors`` (merge_impl lowrank): each factored key's (U, V) is appended to
    ``factor_lists[key]`` and only the dense keys are returned; otherwise every key is returned dense (U Vᵀ), the
    same truncated vector for the other merge implementations."""
    fv = resolve_factored(name, vec, spec)
    check({**fv.dense, **{k: torch.empty(s, device="meta") for k, s in fv.shapes.items()}})
    if not keep_factors:
        return fv.to_dense()
    for k, (u, v) in fv.factors.items():
        factor_lists.setdefault(k, []).append((u.to(dtype or u.dtype), v.to(dtype or v.dtype)))
    return dict(fv.dense)
