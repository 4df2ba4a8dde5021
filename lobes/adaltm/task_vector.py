"""Task vectors (AdaLTM eqs. 2-3): ΔW_task = W_task − W_base over the WavLM backbone parameters.

A :class:`TaskVector` holds one ΔW tensor per floating backbone key (canonical ``WavLMModel`` names, see
:mod:`lobes.adaltm.checkpoint_import`). Integer buffers are skipped (nothing to scale by λ). Weight-norm keys of the
positional convolution (``...parametrizations.weight.original0`` = g, ``original1`` = v) get their own
deltas like any other parameter; the merge decides how they combine.

On disk a task vector is one safetensors file: the ΔW tensors plus string metadata

    format=adaltm-task-vector, format_version, name, kind, base_source, finetuned_source,
    fingerprint, num_layers, hidden_size, num_keys, key_hash, num_params, toolkit_version

(and any user metadata). A vector whose source was LoRA also stores the exact factors of its LoRA-trained
weights (``TaskVector.factors`` {key: (U = B·scaling, V = Aᵀ)}, ΔW = U Vᵀ) as tensors ``factor::<key>::U`` /
``::V``; :mod:`lobes.adaltm.low_rank` uses them instead of a truncated SVD. ``fingerprint``
(:func:`architecture_fingerprint`) lets a merge refuse a vector computed for another architecture before
touching a tensor.

Groups (:func:`backbone_group`), the paper's partition into 25 "layers": ``"group 0"`` = the non-encoder
part (CNN feature extractor, feature projection, positional convolution, ``masked_spec_embed``); ``"layer i"``
= ``encoder.layers.i`` (the paper's l = i + 1); any other key (``encoder.layer_norm``, applied after the last
layer in WavLM-Large's stable-layer-norm layout) is its own group named by its module, so that reports show
it separately and the merge module can assign it explicitly.
"""
import hashlib
import math
import re
from dataclasses import dataclass, field

import torch

from lobes.errors import DataError
from lobes.safetensors_io import read_safetensors, write_safetensors

FORMAT = "adaltm-task-vector"
FORMAT_VERSION = "1"
FACTOR_PREFIX = "factor::"
GROUP0_PREFIXES = (
    "feature_extractor.",
    "feature_projection.",
    "encoder.pos_conv_embed.",
    "masked_spec_embed",
)
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.")
_MAX_LISTED = 20
REQUIRED_METADATA = ("name", "fingerprint", "num_layers", "hidden_size", "num_keys", "key_hash")
# ΔW in any float precision; an integer tensor is not a weight difference λ can scale
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def toolkit_version():
    try:
        from importlib.metadata import version

        return version("adaltm-toolkit")
    except Exception:
        return "unknown"


def backbone_group(key):
    """``"group 0"`` | ``"layer i"`` | the key's module path (e.g. ``"encoder.layer_norm"``)."""
    if key.startswith(GROUP0_PREFIXES):
        return "group 0"
    m = _LAYER_RE.match(key)
    if m:
        return f"layer {int(m.group(1))}"
    return key.rsplit(".", 1)[0] if "." in key else key


def _group_order(g):
    if g == "group 0":
        return (0, 0, g)
    if g.startswith("layer "):
        return (1, int(g.split()[1]), g)
    return (2, 0, g)


@dataclass
class TaskVector:
    """ΔW per backbone key (eq. 2/3), plus string metadata (sources, architecture fingerprint, ...)."""

    name: str
    delta: dict
    metadata: dict = field(default_factory=dict)
    factors: dict = field(default_factory=dict)  # {key: (U, V)} exact low-rank ΔW (LoRA sources)

    def keys(self):
        return sorted(self.delta)

    def num_params(self):
        return sum(t.numel() for t in self.delta.values())

    def norm_per_group(self, group_fn=None):
        """{group: Frobenius norm of ΔW over its keys}, ordered group 0, layer 0.., then other groups."""
        group_fn = group_fn or backbone_group
        sq = {}
        for k, t in self.delta.items():
            g = group_fn(k)
            sq[g] = sq.get(g, 0.0) + float(t.double().pow(2).sum())
        return {g: math.sqrt(sq[g]) for g in sorted(sq, key=_group_order)}

    def norm(self):
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.delta.values()))


# -------------------------------------------------------------------------------------- architecture checks
def _floating_shapes(state):
    """{key: shape} over floating tensors; accepts tensors or plain shapes."""
    out = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor):
            if not t.is_floating_point():
                continue
            out[k] = tuple(t.shape)
        else:
            out[k] = tuple(t)
    return out


def architecture_fingerprint(state_dict):
    """``"wavlm-L<layers>-H<hidden>-K<keys>-<hash>"`` over the floating keys and their shapes.

    Integer buffers are ignored so that a task vector and its base share the fingerprint.
    """
    info = _architecture_info(_floating_shapes(state_dict))
    return f"wavlm-L{info['num_layers']}-H{info['hidden_size']}-K{info['num_keys']}-{info['key_hash']}"


def _architecture_info(shapes):
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_RE.match(k))}
    hidden = "?"
    for k in ("encoder.layer_norm.weight", "feature_projection.projection.weight"):
        if k in shapes:
            hidden = str(shapes[k][0])
            break
    listing = "\n".join(f"{k}:{'x'.join(map(str, shapes[k]))}" for k in sorted(shapes))
    return {
        "num_layers": str(max(layers) + 1 if layers else 0),
        "hidden_size": hidden,
        "num_keys": str(len(shapes)),
        "key_hash": hashlib.sha256(listing.encode()).hexdigest()[:16],
    }


def _mismatch_report(expected, got, expected_name, got_name):
    """Human-readable list of missing / unexpected / shape-mismatched keys ('' when compatible)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    parts = []

    def listing(keys, fmt):
        shown = [fmt(k) for k in keys[:_MAX_LISTED]]
        more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
        return "; ".join(shown) + more

    if missing:
        parts.append(f"{len(missing)} keys missing in {got_name}: {listing(missing, str)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in {got_name}: {listing(unexpected, str)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({expected_name} vs {got_name}): " + listing(
            shapes, lambda k: f"{k} {tuple(expected[k])} vs {tuple(got[k])}"))
    return " | ".join(parts)


def check_compatible(task_vector, base_state):
    """Refuse (DataError naming keys) a task vector whose keys/shapes differ from the base's floating keys."""
    report = _mismatch_report(_floating_shapes(base_state), _floating_shapes(task_vector.delta),
                              "base", f"task vector '{task_vector.name}'")
    if report:
        fp_tv = task_vector.metadata.get("fingerprint", architecture_fingerprint(task_vector.delta))
        raise DataError(f"task vector '{task_vector.name}' ({fp_tv}) does not fit the base "
                        f"({architecture_fingerprint(base_state)}): {report}")


def _nonfinite_keys(state):
    return sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


# --------------------------------------------------------------------------------------------- computation
def compute_task_vector(base_state, finetuned_state, name, metadata=None):
    """ΔW = W_ft − W_base for every floating key (eqs. 2-3); both states must share keys and shapes."""
    report = _mismatch_report(
        {k: tuple(t.shape) for k, t in base_state.items()},
        {k: tuple(t.shape) for k, t in finetuned_state.items()},
        "base", "fine-tuned",
    )
    if report:
        raise DataError(f"task vector '{name}': base and fine-tuned backbones differ: {report}")
    bad = _nonfinite_keys(finetuned_state)
    if bad:
        raise DataError(f"task vector '{name}': fine-tuned weights hold NaN/inf in {bad[:_MAX_LISTED]}"
                        + (f" (+{len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""))
    delta = {}
    for k, wb in base_state.items():
        if not wb.is_floating_point():
            continue  # integer buffers (step counters, indices) are not weights to merge
        wf = finetuned_state[k]
        if not wf.is_floating_point():
            raise DataError(f"task vector '{name}': '{k}' is floating in the base but {wf.dtype} in the fine-tuned")
        wb, wf = wb.detach().cpu(), wf.detach().cpu()
        if wb.dtype in (torch.float16, torch.bfloat16) or wf.dtype in (torch.float16, torch.bfloat16):
            wb, wf = wb.float(), wf.float()  # half-precision subtraction would lose most of a small ΔW
        delta[k] = (wf - wb).contiguous()
    tv = TaskVector(name=name, delta=delta, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    tv.metadata = _complete_metadata(tv)
    return tv


def _complete_metadata(tv):
    meta = dict(tv.metadata)
    meta.update(_architecture_info(_floating_shapes(tv.delta)))
    meta["fingerprint"] = architecture_fingerprint(tv.delta)
    meta["num_params"] = str(tv.num_params())
    meta["name"] = tv.name
    meta["format"] = FORMAT
    meta["format_version"] = FORMAT_VERSION
    meta.setdefault("toolkit_version", toolkit_version())
    for k in ("kind", "base_source", "finetuned_source"):
        meta.setdefault(k, "")
    return meta


# ---------------------------------------------------------------------------------------------------- disk
def save_task_vector(tv, path):
    """Write ``tv`` as safetensors (atomic); returns the path.

    Fingerprint fields are recomputed from the tensors and ``tv.metadata`` is set to exactly what was
    written, so ``load_task_vector(path).metadata == tv.metadata``.
    """
    meta = _complete_metadata(tv)
    tensors = {k: t.detach().cpu().contiguous() for k, t in tv.delta.items()}
    for k, (u, v) in tv.factors.items():
        tensors[f"{FACTOR_PREFIX}{k}::U"], tensors[f"{FACTOR_PREFIX}{k}::V"] = u.contiguous(), v.contiguous()
    write_safetensors(tensors, path, meta)
    tv.metadata = meta
    return path


def load_task_vector(path):
    """Read a task vector written by :func:`save_task_vector`; DataError naming the file on any defect."""
    delta, meta = read_safetensors(path, "task vector file", dtypes=FLOAT_DTYPES, file_format=FORMAT,
                                   metadata_keys=REQUIRED_METADATA)
    factor_keys = [k for k in delta if k.startswith(FACTOR_PREFIX)]
    factors = {k[len(FACTOR_PREFIX):-3]: (delta.pop(k), delta.pop(k[:-1] + "V")) for k in factor_keys
               if k.endswith("::U")}
    fp = architecture_fingerprint(delta)
    if fp != meta["fingerprint"]:
        raise DataError(f"{path}: tensors ({fp}) do not match the stored fingerprint {meta['fingerprint']}")
    bad = _nonfinite_keys(delta)
    if bad:
        raise DataError(f"{path}: task vector holds NaN/inf in {bad[:_MAX_LISTED]}")
    return TaskVector(name=meta["name"], delta=delta, metadata=meta, factors=factors)
