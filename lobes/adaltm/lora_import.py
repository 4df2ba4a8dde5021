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


def _info(cases, module_ranks, alpha, per_layer_sq, per_module, factors, where):
    per_layer = {k: math.sqrt(v) for k, v in per_layer_sq.items()}
    for layer, n in sorted(per_layer.items(), key=lambda kv: str(kv[0]).zfill(6)):
        logger.info("%s: LoRA layer %s ||dW|| = %.6g", where, layer, n)
    distinct, ranks = sorted(set(cases.values())), sorted(set(module_ranks.values()))
    return {
        "case": distinct[0] if len(distinct) == 1 else "mixed",
        "module_cases": cases,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "lora_alpha": alpha,
        "scaling": alpha / ranks[0] if len(ranks) == 1 else {m: alpha / r for m, r in module_ranks.items()},
        "modules": sorted(cases),
        "layers": sorted(k for k in per_layer if isinstance(k, int)),
        "delta_norm_per_layer": per_layer,
        "delta_norm_per_module": per_module,
        "factors": factors,  # {weight key: (U = B·scaling, V = Aᵀ)} of the modules whose ΔW is exactly B A·scaling
    }


def merge_lora(state, base_state, lora_alpha, where):
    """Fold loralib A/B pairs into their weights; returns (state, lora_info) (info None without LoRA keys)."""
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
    cases, module_ranks, per_layer_sq, per_module, factors = {}, {}, {}, {}, {}
    for m in modules:
        a, b, w, wb = _pair(state, base_state, m, where)
        r = module_ranks[m] = a.shape[0]
        kw = m + ".weight"
        delta = (b @ a) * (alpha / r)
        cases[m], state[kw] = _case(w, wb, delta, kw, where)
        if cases[m] != "unmerged_over_modified":  # ΔW = B A·scaling exactly: low_rank keeps these factors
            factors[kw] = ((b * (alpha / r)).contiguous(), a.T.contiguous())
        per_module[m] = dn = float(delta.norm())
        mt = _LAYER_RE.match(m)
        layer = int(mt.group(1)) if mt else m
        per_layer_sq[layer] = per_layer_sq.get(layer, 0.0) + dn * dn
    return state, _info(cases, module_ranks, alpha, per_layer_sq, per_module, factors, where)
