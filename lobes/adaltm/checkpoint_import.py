"""Load a WavLM backbone state dict, in canonical ``WavLMModel`` key names, from any supported checkpoint.

AdaLTM (eqs. 2-3) needs W_base, W_ASR and W_SER with *identical* key names and shapes, whatever the
toolkit or wrapper that saved them. :func:`load_backbone_state` reads one source and returns
``(state_dict, info)``: floating tensors as float32 on CPU (integer buffers keep their dtype), keys as in
``transformers.WavLMModel().state_dict()``, and an ``info`` dict saying what was found and done.

Supported layouts (``kind``):

``"hf"``
    A ``WavLMModel.save_pretrained`` directory or a hub id (e.g. ``microsoft/wavlm-large``): ``config.json``
    plus ``model.safetensors`` (or sharded ``model.safetensors.index.json``), or the older
    ``pytorch_model.bin`` (/ ``pytorch_model.bin.index.json``). Keys are bare ``WavLMModel`` keys
    (``feature_extractor.conv_layers.*``, ``feature_projection.*``, ``encoder.*``, ``masked_spec_embed``).
    The files are read directly instead of through ``from_pretrained``: ``from_pretrained`` silently fills
    missing keys with random init, which would turn into a garbage task vector.
``"hf_ctc"``
    A ``WavLMForCTC`` directory / hub id (e.g. ``patrickvonplaten/wavlm-libri-clean-100h-large``, the
    out-of-domain ASR source): same files, backbone keys are ``wavlm.<WavLMModel key>``; the head
    (``lm_head.weight``, ``lm_head.bias``; for other ``WavLMFor*`` heads: anything outside ``wavlm.``) is dropped.
``"speechbrain"``
    A ``*.ckpt`` file written by ``torch.save(module.state_dict())`` from our recipes, whose module holds the
    WavLM as ``self.model`` (SpeechBrain's HuggingFace wrapper), so keys are ``model.<WavLMModel key>``; a bare
    ``WavLMModel`` state dict (no prefix) is accepted too. A SpeechBrain checkpoint directory ``CKPT+<stamp>``
    is accepted: ``wavlm.ckpt`` in it is used, otherwise the single ``*.ckpt`` file (optimizer files
    skipped) that holds a WavLM. A save folder holding exactly one ``CKPT+*`` directory is accepted as well.
``"voxprofile"``
    ``tiantiaf/wavlm-large-categorical-emotion`` (vox-profile ``WavLMWrapper``, a ``PyTorchModelHubMixin``):
    a directory with ``config.json`` (the wrapper's init kwargs, e.g. ``finetune_method``, ``lora_rank``) and
    ``model.safetensors`` (older huggingface_hub: ``pytorch_model.bin``). Backbone keys are
    ``backbone_model.<WavLMModel key>``; head keys (``weights``, ``model_seq.*``, ``emotion_layer.*``,
    ``detailed_out_layer.*``, ``arousal_layer.*``, ``valence_layer.*``, ``dominance_layer.*``) are dropped.
    Full weights or LoRA: vox-profile's release notes list
    ``wavlm-large-categorical-emotion`` as "Use LoRa: No" (changed from "Yes / 16" in May 2025), so the file is
    most likely a full fine-tune, imported like any full-weight checkpoint. Its training code still defaults to
    LoRA, and earlier or other vox-profile checkpoints can carry LoRA keys, so the LoRA path below is kept: the
    importer tells the two apart from the keys (``info["case"]``), not from a name.

LoRA (any kind; vox-profile's code default, though its release notes list the categorical model as not LoRA):
loralib ``Linear`` layers add ``<module>.lora_A`` (r x in) and ``<module>.lora_B`` (out x r) next to
``<module>.weight``; vox-profile wraps ``feed_forward.intermediate_dense``
and ``feed_forward.output_dense`` of the layers with index > num_layers // 2 (13-23 of 24) with
``lora.Linear(in, out, r=lora_rank)``, i.e. loralib's default ``lora_alpha=1``, so
``scaling = lora_alpha / r = 1/16`` for the default rank 16 (override with ``lora_alpha=``).
The effective fine-tuned weight is ``W + B @ A * scaling``. loralib merges that product *into* ``weight``
when the module is put in ``eval()`` mode, so a checkpoint saved after ``eval()`` holds merged weights and
still carries A and B. With ``base_state`` given, each LoRA module is classified:

* ``unmerged``: stored weight == base weight -> returned weight = stored + B@A*scaling;
* ``merged``:   stored weight - base == B@A*scaling -> returned weight = stored;
* ``unmerged_over_modified``: neither (the backbone itself was also trained, or a wrong base):
  returned weight = stored + B@A*scaling, and a warning is logged.

Without ``base_state`` a LoRA checkpoint is refused (the two cases cannot be told apart).

peft LoRA (``"peft"``, detected from the ``base_model.model.`` key root): a ``save_pretrained`` adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``<module>.lora_A.weight``; the backbone is then
``base_state``) or a ``PeftModel.state_dict()`` file beside its ``adapter_config.json`` (``.lora_A.default.weight``,
``.base_layer.weight``). The names become loralib's and the pairs are folded as above, with peft's scaling from
the config: ``lora_alpha / r``, ``lora_alpha / √r`` with ``use_rslora``, r and alpha per module from
``rank_pattern`` / ``alpha_pattern``. DoRA, LoRA biases and several adapters are refused.
The per-layer ||B@A*scaling|| (Frobenius over the layer's LoRA modules) is logged and put in ``info``.

Weight norm: the positional convolution ``encoder.pos_conv_embed.conv`` uses weight norm; older checkpoints
store ``weight_g`` / ``weight_v``, newer torch ``parametrizations.weight.original0`` / ``original1`` (same
shapes, same meaning: g = magnitude, v = direction). Legacy names are renamed to the parametrization names;
g and v are kept as stored (the merge module decides how to combine them; see
:func:`weight_norm_effective` for the effective weight).

Safety: every ``torch.load`` uses ``weights_only=True``; a file that holds pickled Python objects, a
truncated or corrupt file, or a file without a WavLM in it raises :class:`lobes.errors.DataError` naming it.
"""
import json
import logging
import re
from pathlib import Path

import torch

from lobes.adaltm.lora_import import is_peft_state, merge_lora, peft_to_loralib
from lobes.errors import DataError
from lobes.safetensors_io import read_safetensors

logger = logging.getLogger(__name__)

KINDS = ("auto", "hf", "hf_ctc", "speechbrain", "voxprofile", "peft")

# The key every WavLMModel has exactly once: it locates the backbone prefix in any wrapper.
ANCHOR_KEY = "feature_projection.projection.weight"

# Backbone prefix each wrapper uses (kind -> accepted prefixes, first = the documented one).
PREFIXES = {
    "hf": ("", "wavlm."),  # from_pretrained strips "wavlm." too, so a WavLMFor* file is still a WavLM
    "hf_ctc": ("wavlm.",),
    "speechbrain": ("model.", ""),
    "voxprofile": ("backbone_model.",),
}
_PREFIX_TO_KIND = {"": "hf", "wavlm.": "hf_ctc", "model.": "speechbrain", "backbone_model.": "voxprofile"}

WEIGHT_NORM_RENAMES = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}

# File names tried, in order, in a save_pretrained / PyTorchModelHubMixin directory or hub repo.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's save_pretrained
_TORCH_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------- file readers
def _read_safetensors(path):
    return read_safetensors(path, "checkpoint file")[0]  # any dtype: _to_float32_cpu converts floating ones


def _read_torch(path):
    """torch.load with weights_only=True: pickled Python objects are refused, never executed."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{path}: cannot load as a tensor-only checkpoint (torch.load weights_only=True); the file is "
            f"truncated/corrupt or holds pickled Python objects, which are refused: {type(e).__name__}: {msg}"
        ) from e
    # Lightning-style wrappers keep the weights under "state_dict".
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{path}: not a plain state dict; non-tensor entries: {_cap(sorted(map(str, bad)))}")
    return dict(obj)


def _read_weight_file(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _read_torch(path)
    raise DataError(f"{path}: unknown checkpoint file type (expected .safetensors, {', '.join(_TORCH_SUFFIXES)})")


def _read_sharded(index_path, fetch=None):
    """HF sharded checkpoint: ``*.index.json`` with ``weight_map`` {key: shard file name}."""
    try:
        weight_map = json.loads(Path(index_path).read_text())["weight_map"]
    except Exception as e:
        raise DataError(f"{index_path}: not a valid sharded-checkpoint index (needs 'weight_map'): {e}") from e
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = fetch(shard) if fetch else Path(index_path).parent / shard
        part = _read_weight_file(shard_path)
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise DataError(f"{index_path}: keys listed in weight_map but absent from the shards: {_cap(missing)}")
    return state


# ------------------------------------------------------------------------------------------ source resolving
def _read_config(directory, name="config.json"):
    cfg = Path(directory) / name
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except Exception as e:
        raise DataError(f"{cfg}: invalid JSON: {e}") from e


def _sb_checkpoint_file(directory):
    """Pick the WavLM ``.ckpt`` inside a SpeechBrain ``CKPT+*`` directory."""
    directory = Path(directory)
    if (directory / "wavlm.ckpt").is_file():
        return directory / "wavlm.ckpt"
    candidates = []
    for f in sorted(directory.glob("*.ckpt")):
        if "optim" in f.name:  # optimizer states are large and never hold the weights
            continue
        try:
            keys = _read_torch(f).keys()
        except DataError:
            continue  # counters, dataloader states...: not a module state dict
        if any(k.endswith(ANCHOR_KEY) for k in keys):
            candidates.append(f)
    if len(candidates) != 1:
        found = [f.name for f in sorted(directory.glob("*.ckpt"))]
        raise DataError(
            f"{directory}: expected wavlm.ckpt or exactly one *.ckpt holding a WavLM, found "
            f"{len(candidates)} WavLM checkpoints among {found}"
        )
    return candidates[0]


def _resolve_local(path):
    """Local file or directory -> (state, files, config)."""
    path = Path(path)
    if path.is_file():
        config = _read_config(path.parent) if path.suffix in (".safetensors", ".bin") else None
        return _read_weight_file(path), [str(path)], config
    if not path.is_dir():
        raise DataError(f"{path}: checkpoint not found (neither a file, a directory nor a hub id)")
    for name in PEFT_WEIGHT_FILES if (path / PEFT_CONFIG).is_file() else ():
        if (path / name).is_file():
            return _read_weight_file(path / name), [str(path / name)], _read_config(path)
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return _read_weight_file(path / name), [str(path / name)], _read_config(path)
    if list(path.glob("*.ckpt")):
        f = _sb_checkpoint_file(path)
        return _read_torch(f), [str(f)], None
    ckpt_dirs = sorted(d for d in path.glob("CKPT+*") if d.is_dir())
    if len(ckpt_dirs) == 1:
        f = _sb_checkpoint_file(ckpt_dirs[0])
        return _read_torch(f), [str(f)], None
    if len(ckpt_dirs) > 1:
        raise DataError(f"{path}: holds {len(ckpt_dirs)} SpeechBrain checkpoints {[d.name for d in ckpt_dirs]}; "
                        "pass the CKPT+... directory to use")
    present = sorted(p.name for p in path.iterdir())
    raise DataError(f"{path}: no checkpoint found (looked for {list(HF_WEIGHT_FILES)}, *.ckpt, CKPT+*/); "
                    f"directory holds {_cap(present)}")


def _resolve_hub(repo_id):
    """Hub id -> (state, files, config) via the local HF cache / hub (never from_pretrained, see module doc)."""
    from huggingface_hub import hf_hub_download

    errors = []

    def fetch(name):
        return hf_hub_download(repo_id, name)

    config = None
    try:
        config = json.loads(Path(fetch("config.json")).read_text())
    except Exception as e:  # optional; a missing config only loses info fields
        errors.append(f"config.json: {type(e).__name__}")
    for name in HF_WEIGHT_FILES:
        try:
            local = Path(fetch(name))
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            continue
        if name.endswith(".index.json"):
            return _read_sharded(local, fetch=fetch), [f"{repo_id}/{name}"], config
        return _read_weight_file(local), [f"{repo_id}/{name}"], config
    raise DataError(f"{repo_id}: no weights could be fetched from the hub/cache: {'; '.join(errors)}")


def _resolve(source):
    p = Path(str(source))
    if p.exists() or not _HUB_ID.match(str(source)):
        return _resolve_local(p)
    return _resolve_hub(str(source))


# -------------------------------------------------------------------------------------------- key handling
def _cap(keys, n=20):
    keys = list(keys)
    head = ", ".join(keys[:n])
    return head + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _find_prefix(state, where):
    anchors = [k[: -len(ANCHOR_KEY)] for k in state if k == ANCHOR_KEY or k.endswith("." + ANCHOR_KEY)]
    if not anchors:
        raise DataError(f"{where}: no WavLM backbone found (no key ending in '{ANCHOR_KEY}'); "
                        f"keys: {_cap(sorted(state), 10)}")
    if len(anchors) > 1:
        raise DataError(f"{where}: several WavLM backbones found, prefixes {sorted(anchors)}")
    return anchors[0]


def _detect_kind(prefix, files, where):
    if prefix in _PREFIX_TO_KIND:
        kind = _PREFIX_TO_KIND[prefix]
        if kind == "hf" and files and files[0].endswith(".ckpt"):
            kind = "speechbrain"  # bare WavLMModel state dict saved by torch.save
        return kind
    raise DataError(f"{where}: backbone prefix '{prefix}' matches no supported layout "
                    f"{ {v: k for k, v in _PREFIX_TO_KIND.items()} }")


def normalize_weight_norm_keys(state, where="state dict"):
    """Rename legacy ``weight_g``/``weight_v`` to ``parametrizations.weight.original0/1`` (returns a new dict)."""
    out = dict(state)
    for old, new in WEIGHT_NORM_RENAMES.items():
        if old in out:
            if new in out:
                raise DataError(f"{where}: holds both '{old}' and '{new}'; cannot tell which is the weight")
            out[new] = out.pop(old)
    return out


def weight_norm_effective(g, v, dim=2):
    """Effective weight-norm weight w = g * v / ||v||, the norm taken over every dim except ``dim``
    (WavLM's pos_conv uses ``weight_norm(conv, name="weight", dim=2)``)."""
    return torch._weight_norm(v, g, dim)


def _to_float32_cpu(state):
    converted = set()
    out = {}
    for k, t in state.items():
        t = t.detach().to("cpu")
        if t.is_floating_point() and t.dtype != torch.float32:
            converted.add(str(t.dtype))
            t = t.to(torch.float32)
        out[k] = t.contiguous()
    return out, sorted(converted)


def _compare_to_base(state, base_state):
    """Keys (shared, same shape) whose values differ from the base: tells full fine-tune from frozen."""
    changed = [k for k, t in state.items()
               if k in base_state and base_state[k].shape == t.shape and not torch.equal(t, base_state[k].to(t.dtype))]
    return changed


def _peft_state(raw, kind, files, base_state, lora_alpha, where):
    """A peft LoRA checkpoint as loralib names (lora_import) -> (state, {module: scaling}, lora_alpha); other
    checkpoints pass unchanged with scalings None. Its scaling comes from the adapter_config.json beside it."""
    if not is_peft_state(raw):
        if kind == "peft":
            raise DataError(f"{where}: expected a peft checkpoint, but no key starts with 'base_model.model.'")
        return raw, None, lora_alpha
    if kind not in ("auto", "peft"):
        raise DataError(f"{where}: a peft checkpoint (keys 'base_model.model.*'), not '{kind}'; use kind peft")
    if lora_alpha is not None:
        raise DataError(f"{where}: lora_alpha is given, but a peft checkpoint's comes from its {PEFT_CONFIG}")
    cfg = _read_config(Path(files[0]).parent, PEFT_CONFIG) if files and Path(files[0]).exists() else None
    state, scalings = peft_to_loralib(raw, cfg, base_state, ANCHOR_KEY, where)
    return state, scalings, cfg["lora_alpha"]


def _case_vs_base(state, base_state, lora, where):
    """``info`` fields saying what the checkpoint is against its base: ``case`` (and ``changed_keys_vs_base``)."""
    if base_state is None:
        return {"case": "full weights (no LoRA keys; not compared to a base)"}
    changed = _compare_to_base(state, base_state)
    out = {"changed_keys_vs_base": len(changed)}
    if lora is not None:
        lora_w = {m + ".weight" for m in lora["modules"]}
        others = [k for k in changed if k not in lora_w]
        out["case"] = (f"LoRA ({lora['case']}) on {len(lora['modules'])} modules; "
                       + ("rest of the backbone equals the base, so the task vector is zero elsewhere"
                          if not others else f"{len(others)} other keys also differ from the base"))
    elif changed:
        out["case"] = f"full weights, {len(changed)} of {len(state)} keys differ from the base"
    else:
        out["case"] = "identical to the base: the task vector is zero (frozen backbone?)"
        logger.warning("%s: backbone equals the base state; its task vector is all zeros", where)
    return out


# ------------------------------------------------------------------------------------------------ public API
def load_backbone_state(source, kind="auto", base_state=None, lora_alpha=None):
    """Load a WavLM backbone state dict in canonical ``WavLMModel`` key names.

    Args:
        source: local file / directory, or a hub id (read from the HF cache or hub).
        kind: one of ``KINDS`` (module doc describes each layout); "auto" detects by key prefix and files.
        base_state: canonical base state dict (needed for LoRA checkpoints; also used to report how many
            keys differ from the base).
        lora_alpha: loralib ``lora_alpha`` (default 1, loralib's default used by vox-profile); scaling = alpha / r.

    Returns:
        ``(state_dict, info)``; ``info`` has ``source, kind, files, prefix, dropped_keys, weight_norm, lora,
        case, num_keys, converted_dtypes, config`` (and ``changed_keys_vs_base`` when ``base_state`` is given).
    """
    if kind not in KINDS:
        raise DataError(f"{source}: unknown checkpoint kind '{kind}' (choose from {KINDS})")
    raw, files, config = _resolve(source)
    where = files[0] if files else str(source)
    raw, scalings, lora_alpha = _peft_state(raw, kind, files, base_state, lora_alpha, where)
    prefix = _find_prefix(raw, where)
    detected = "peft" if scalings else _detect_kind(prefix, files, where)
    if kind == "auto":
        kind = detected
    elif kind != "peft" and prefix not in PREFIXES[kind]:
        raise DataError(f"{where}: expected a '{kind}' checkpoint (backbone prefix {PREFIXES[kind]}), "
                        f"but its WavLM keys start with '{prefix}' (looks like '{detected}')")

    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    dropped = sorted(k for k in raw if not k.startswith(prefix))

    legacy = any(k in state for k in WEIGHT_NORM_RENAMES)
    state = normalize_weight_norm_keys(state, where)
    has_param = any(".parametrizations.weight.original" in k for k in state)
    weight_norm = "legacy weight_g/weight_v (renamed)" if legacy else ("parametrizations" if has_param else "none")

    scalings = scalings and {m[len(prefix):]: v for m, v in scalings.items()}
    state, lora = merge_lora(state, base_state, lora_alpha, where, scalings=scalings)
    state, converted = _to_float32_cpu(state)

    info = {"source": str(source), "kind": kind, "files": files, "prefix": prefix, "dropped_keys": dropped,
            "weight_norm": weight_norm, "lora": lora, "num_keys": len(state), "converted_dtypes": converted,
            "config": config}
    if config and kind == "voxprofile":
        info["voxprofile_finetune_method"] = config.get("finetune_method")
        info["voxprofile_lora_rank"] = config.get("lora_rank")
        if config.get("finetune_method") in ("lora", "combined") and lora is None:
            logger.warning("%s: config says finetune_method=%s but the weights carry no LoRA keys",
                           where, config.get("finetune_method"))

    info.update(_case_vs_base(state, base_state, lora, where))
    logger.info("%s: kind=%s prefix='%s' keys=%d dropped=%d weight_norm=%s case=%s",
                where, kind, prefix, len(state), len(dropped), weight_norm, info["case"])
    return state, info
