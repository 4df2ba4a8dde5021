"""Fold learned λ into one plain HF ``WavLMModel`` (safetensors), usable without this toolkit.

    from transformers import WavLMModel
    wavlm = WavLMModel.from_pretrained("exp/.../folded_wavlm")   # W_base + Σ_k λ_k ΔW_k, per group

The export directory also holds ``merge_info.json`` (λ per group per vector, vector names, base source) and,
when given, the downstream modules (α + SER head) as ``downstream.safetensors`` with ``downstream.json``.
"""
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import WavLMModel

from lobes.errors import DataError


def fold_to_wavlm(merged):
    """A fresh ``WavLMModel`` whose weights are the merged weights of ``merged`` (a MergedWavLM)."""
    model = WavLMModel(merged.model.config)
    missing, unexpected = model.load_state_dict(merged.merged_state_dict(), strict=False)
    if missing or unexpected:
        raise DataError(f"folded state does not match WavLMModel: missing {missing}, unexpected {unexpected}")
    return model.eval()


def export_folded(merged, out_dir, downstream=None, downstream_config=None):
    """Write the folded model (and optional downstream modules) to ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fold_to_wavlm(merged).save_pretrained(tmp, safe_serialization=True)
    info = {"base_source": merged.source, "task_vectors": merged.lambdas.vector_names,
            "lambda_mode": merged.lambdas.mode, "lambda": merged.coefficients()}
    (tmp / "merge_info.json").write_text(json.dumps(info, indent=2))
    if downstream:
        state = {f"{name}.{k}": v.detach().cpu().contiguous()
                 for name, module in downstream.items() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "downstream.safetensors"))
        (tmp / "downstream.json").write_text(json.dumps(downstream_config or {}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_downstream(export_dir, modules):
    """Load ``downstream.safetensors`` into the given {name: module} (e.g. weighted_sum, ser_head)."""
    path = Path(export_dir) / "downstream.safetensors"
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on truncation
        raise DataError(f"cannot read downstream weights '{path}': {e}") from e
    for name, module in modules.items():
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        module.load_state_dict(sub, strict=True)
    return modules
