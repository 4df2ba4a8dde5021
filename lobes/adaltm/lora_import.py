"""loralib LoRA pairs in an imported checkpoint (vox-profile's WavLM): each ``<module>.lora_A`` / ``lora_B`` pair is
folded into ``<module>.weight``, merged or not, judged against the base weight (see ``checkpoint_import``'s module
doc), and its exact factors are kept for the low-rank path (ΔW = B A·scaling needs no truncation)."""
import logging
import math
import re

import torch

from lobes.errors import DataError

logger = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.")


def _pair(state, base_state, m, where):
    """The checked (A, B, W, W_base) of LoRA module ``m``, A and B popped from ``state``."""
    ka, kb, kw = m + ".lora_A", m + ".lora_B", m + ".weight"
    if ka not in state or kb not in state:
        raise DataError(f"{where}: LoRA module '{m}' has only one of lora_A / lora_B")
    if kw not in state:
        raise DataError(f"{where}: LoRA module '{m}' has no '{kw}'")
    if kw not in base_state:
        raise DataError(f"{where}: LoRA weight '{kw}' is not in the base state")
    a, b, w = state.pop(ka).float(), state.pop(kb).float(), state[kw].float()
    wb = base_state[kw].to(torch.float32)
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
        raise DataError(f"{where}: LoRA shapes do not fit '{kw}' {tuple(w.shape)}: "
                        f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}")
    if wb.shape != w.shape:
        raise DataError(f"{where}: '{kw}' shape {tuple(w.shape)} differs from base {tuple(wb.shape)}")
    return a, b, w, wb


def _case(w, wb, delta, kw, where):
    """Is the stored weight the base (LoRA unmerged), base + BA (merged), or neither? -> (case, merged weight)."""
    # float32 rounding of a merge is ~6e-8 |w| per element, far under 1e-6 ||W_base||.
    tol = 1e-6 * float(wb.norm()) + 1e-3 * float(delta.norm())
    if float((w - wb).norm()) <= tol:
        return "unmerged", w + delta
    if float((w - wb - delta).norm()) <= tol:
        return "merged", w
    logger.warning("%s: '%s' differs from the base by more than its LoRA product; treating the LoRA as "
                   "unmerged on top of a trained weight (wrong base?)", where, kw)
    return "unmerged_over_modified", w + delta


def _info(cases, module_ranks, alpha, module_scalings, per_layer_sq, per_module, factors, where):
    per_layer = {k: math.sqrt(v) for k, v in per_layer_sq.items()}
    for layer, n in sorted(per_layer.items(), key=lambda kv: str(kv[0]).zfill(6)):
        logger.info("%s: LoRA layer %s ||dW|| = %.6g", where, layer, n)
    distinct, ranks = sorted(set(cases.values())), sorted(set(module_ranks.values()))
    scalings = sorted(set(module_scalings.values()))
    return {
        "case": distinct[0] if len(distinct) == 1 else "mixed",
        "module_cases": cases,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "lora_alpha": alpha,
        "scaling": scalings[0] if len(scalings) == 1 else dict(module_scalings),
        "modules": sorted(cases),
        "layers": sorted(k for k in per_layer if isinstance(k, int)),
        "delta_norm_per_layer": per_layer,
        "delta_norm_per_module": per_module,
        "factors": factors,  # {weight key: (U = B·scaling, V = Aᵀ)} of the modules whose ΔW is exactly B A·scaling
    }


def merge_lora(state, base_state, lora_alpha, where, scalings=None):
    """Fold loralib A/B pairs into their weights; returns (state, lora_info) (info None without LoRA keys).
    ``scalings`` {module: scaling} (peft's, from its adapter config) replaces loralib's lora_alpha / r."""
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".lora_A", ".lora_B"))})
    if not modules:
        return state, None
    if base_state is None:
        shown = ", ".join(m + ".lora_A" for m in modules[:3]) + (
            f", ... (+{len(modules) - 3} more)" if len(modules) > 3 else "")
        raise DataError(f"{where}: holds LoRA keys ({shown}); pass "
                        "base_state= so the importer can tell merged from unmerged LoRA weights")
    alpha = 1.0 if lora_alpha is None else float(lora_alpha)
    state = dict(state)
    cases, module_ranks, module_scalings, per_layer_sq, per_module, factors = {}, {}, {}, {}, {}, {}
    for m in modules:
        a, b, w, wb = _pair(state, base_state, m, where)
        r = module_ranks[m] = a.shape[0]
        scaling = module_scalings[m] = scalings[m] if scalings is not None else alpha / r
        kw = m + ".weight"
        delta = (b @ a) * scaling
        cases[m], state[kw] = _case(w, wb, delta, kw, where)
        if cases[m] != "unmerged_over_modified":  # ΔW = B A·scaling exactly: low_rank keeps these factors
            factors[kw] = ((b * scaling).contiguous(), a.T.contiguous())
        per_module[m] = dn = float(delta.norm())
        mt = _LAYER_RE.match(m)
        layer = int(mt.group(1)) if mt else m
        per_layer_sq[layer] = per_layer_sq.get(layer, 0.0) + dn * dn
    return state, _info(cases, module_ranks, alpha, module_scalings, per_layer_sq, per_module, factors, where)


# ------------------------------------------------------------------------------------------------- peft LoRA
# peft names: a PeftModel's state_dict() has ``base_model.model.<module>.lora_A.<adapter>.weight`` and the frozen
# weight as ``<module>.base_layer.weight``; ``save_pretrained`` writes only the adapter, names without the adapter
# (``<module>.lora_A.weight``), beside ``adapter_config.json`` (r, lora_alpha, use_rslora, rank/alpha patterns).
PEFT_ROOT = "base_model.model."
WRAPPER_PREFIXES = ("", "wavlm.", "model.", "backbone_model.")
_PEFT_LORA_RE = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def is_peft_state(state):
    return any(k.startswith(PEFT_ROOT) for k in state)


def _check_peft_config(cfg, where):
    if cfg is None:  # alpha and rsLoRA live only there: a guessed scaling would give a wrong ΔW
        raise DataError(f"{where}: holds peft keys ({PEFT_ROOT}...) but no adapter_config.json lies beside it; "
                        "the LoRA scaling (lora_alpha, r, use_rslora) is unknown")
    if cfg.get("peft_type") != "LORA":
        raise DataError(f"{where}: peft_type {cfg.get('peft_type')!r} in adapter_config.json; only LORA is imported")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias"):  # no longer ΔW = B A·scaling on an nn.Linear weight
        if cfg.get(key):
            raise DataError(f"{where}: adapter_config.json sets {key}; only plain LoRA (ΔW = B A·scaling) is imported")


def _peft_names(state, where):
    """peft keys -> loralib names (``<module>.lora_A`` / ``lora_B``, ``<module>.weight`` for ``base_layer``)."""
    out, adapters = {}, set()
    for k, v in state.items():
        name = k[len(PEFT_ROOT):] if k.startswith(PEFT_ROOT) else k
        if ".original_module." in name:  # the frozen copy beside a modules_to_save one
            continue
        m = _PEFT_LORA_RE.match(name)
        if m:
            adapters.add(m["adapter"])
            out[f"{m['m']}.lora_{m['ab']}"] = v
            continue
        if "lora_" in name:
            raise DataError(f"{where}: peft key '{k}' is not a LoRA A/B weight (DoRA, LoRA bias, embedding "
                            "LoRA...); only plain LoRA on linear layers is imported")
        out[re.sub(r"\.(base_layer|modules_to_save(\.[^.]+)?)\.(?=[^.]+$)", ".", name)] = v
    if len(adapters) > 1:
        raise DataError(f"{where}: holds several peft adapters {sorted(map(str, adapters))}; save one")
    return out


def _fill_base(state, modules, base_state, where):
    """An adapter alone (no backbone weights): the backbone is the base, under the wrapper prefix of the modules."""
    if base_state is None:
        raise DataError(f"{where}: a peft adapter without backbone weights; pass base_state= (the base it trained on)")
    for p in WRAPPER_PREFIXES:
        if all(m.startswith(p) and m[len(p):] + ".weight" in base_state for m in modules):
            return {**{p + k: v for k, v in base_state.items()}, **state}
    raise DataError(f"{where}: the adapter's modules {sorted(modules)[:3]} are not weights of the base WavLM "
                    f"(under any of the prefixes {list(WRAPPER_PREFIXES)})")


def peft_to_loralib(state, cfg, base_state, anchor_key, where):
    """A peft LoRA state (adapter file or a PeftModel's state_dict) as loralib names, the backbone filled in from
    ``base_state`` when the file holds the adapter only; returns (state, {module: scaling}), scaling as peft's
    LoraLayer sets it: alpha / r, or alpha / √r with use_rslora, r and alpha per module from rank/alpha_pattern."""
    from peft.utils.other import get_pattern_key  # peft's own module-name matching of the patterns

    _check_peft_config(cfg, where)
    state = _peft_names(state, where)
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".lora_A", ".lora_B"))})
    if not modules:
        raise DataError(f"{where}: a peft checkpoint without LoRA A/B weights")
    if not any(k == anchor_key or k.endswith("." + anchor_key) for k in state):
        state = _fill_base(state, modules, base_state, where)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    scalings = {}
    for m in modules:  # m is peft's module name in the wrapped model, the name its patterns match
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), m), cfg["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), m), cfg["lora_alpha"])
        a = state.get(m + ".lora_A")
        if a is not None and a.shape[0] != r:
            raise DataError(f"{where}: '{m}.lora_A' has rank {a.shape[0]}, adapter_config.json says r={r}")
        scalings[m] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return state, scalings
