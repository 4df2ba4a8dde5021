"""Fold learned λ into one plain HF ``WavLMModel`` (safetensors), usable without this toolkit, and load it back.

    from transformers import WavLMModel
    wavlm = WavLMModel.from_pretrained("exp/.../folded_wavlm")   # W_base + Σ_k λ_k ΔW_k, per group

The export directory also holds ``merge_info.json`` (λ per group per vector, vector names, base source) and,
when given, the downstream modules (α + SER head) as ``downstream.safetensors`` with ``downstream.json``.
``downstream.json`` states the configuration of every downstream module under its name (``weighted_sum``:
``num_layers``, ``include_cnn``, ``layer_norm``; ``ser_head``: the :class:`lobes.ser_head.SERHead` arguments,
layer sizes, pooling and class count included), plus ``classes`` and ``normalize_wav``:
:func:`load_folded_export` builds the modules from it and never infers sizes from parameter names.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import WavLMModel

from lobes.errors import DataError
from lobes.inference import Recognizer
from lobes.ser_head import SERHead
from lobes.wavlm_encoder import run_wavlm
from lobes.weighted_sum import WeightedLayerSum

FORMAT_VERSION = 2  # 2: downstream.json states each module's configuration (1: flat keys only)


def fold_to_wavlm(merged):
    """A fresh ``WavLMModel`` whose weights are the merged weights of ``merged`` (a MergedWavLM)."""
    model = WavLMModel(merged.model.config)
    missing, unexpected = model.load_state_dict(merged.merged_state_dict(), strict=False)
    if missing or unexpected:
        raise DataError(f"folded state does not match WavLMModel: missing {missing}, unexpected {unexpected}")
    return model.eval()


class FoldedEncoder(torch.nn.Module):
    """A plain ``WavLMModel`` (a folded export) with the recipes' encoder contract (hidden states, frame mask)."""

    def __init__(self, model, normalize_wav=True):
        super().__init__()
        self.model = model
        self.normalize_wav = normalize_wav

    def forward(self, wavs, wav_lens):
        return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)


def folded_encoder(merged):
    """λ baked into one plain WavLM once: the same features as ``merged`` without re-merging at every batch."""
    return FoldedEncoder(fold_to_wavlm(merged), merged.normalize_wav)


def module_config(module):
    """The constructor arguments of a downstream module, as ``downstream.json`` records them."""
    if isinstance(module, SERHead):
        return dict(module.config)
    if isinstance(module, WeightedLayerSum):
        return {"num_layers": module.weights.numel() - int(module.include_cnn),
                "include_cnn": bool(module.include_cnn), "layer_norm": bool(module.layer_norm)}
    raise TypeError(f"cannot state the configuration of a {type(module).__name__} in downstream.json")


def export_folded(merged, out_dir, downstream=None, downstream_config=None):
    """Write the folded model (and optional downstream modules) to ``out_dir`` atomically.

    ``downstream``: {name: module}; ``downstream_config``: settings to record beside them (``classes``,
    ``normalize_wav``, ...). Each module's own configuration is added under its name.
    """
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
        config = {**(downstream_config or {}), "format_version": FORMAT_VERSION,
                  **{name: module_config(module) for name, module in downstream.items()}}
        (tmp / "downstream.json").write_text(json.dumps(config, indent=2))
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
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise DataError(f"{path}: '{name}' does not fit the configuration in downstream.json ({e})") from e
    return modules


def is_folded_export(path):
    path = Path(path)
    return (path / "config.json").is_file() and (path / "downstream.json").is_file()


def _legacy_sections(cfg):
    """Format 1 (flat keys written by the AdaLTM recipe before format 2): its one-projection head, stated."""
    return {"weighted_sum": {"num_layers": cfg["num_layers"], "include_cnn": cfg["include_cnn"],
                             "layer_norm": cfg["layer_norm"]},
            "ser_head": {"input_size": cfg["hidden_size"], "hidden_size": cfg["head_hidden"],
                         "num_classes": len(cfg["classes"]), "pooling": cfg["pooling"], "num_proj_layers": 1,
                         "head_type": cfg["head_type"]}}


def read_downstream_config(export_dir):
    """``downstream.json`` with its ``weighted_sum`` / ``ser_head`` sections; DataError naming the file and the
    missing keys when it cannot describe the modules."""
    cfg_file = Path(export_dir) / "downstream.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{cfg_file}: cannot read the downstream configuration ({e})") from e
    if "ser_head" not in cfg:
        try:
            cfg.update(_legacy_sections(cfg))
        except KeyError as e:
            raise DataError(f"{cfg_file}: states no 'ser_head' / 'weighted_sum' configuration and lacks {e} to "
                            "derive it; export the model again") from e
    missing = [k for k in ("classes", "normalize_wav", "weighted_sum", "ser_head") if k not in cfg]
    if missing:
        raise DataError(f"{cfg_file}: lacks {missing}")
    return cfg


def load_folded_export(export_dir, device="cpu"):
    """A :class:`lobes.inference.Recognizer` over a folded export: plain HF WavLM + α + emotion head, each built
    from the configuration ``downstream.json`` states."""
    export_dir = Path(export_dir).resolve()
    cfg = read_downstream_config(export_dir)
    try:
        model = WavLMModel.from_pretrained(str(export_dir))
    except Exception as e:
        raise DataError(f"{export_dir}: cannot load the folded WavLM ({e})") from e
    try:
        modules = {"weighted_sum": WeightedLayerSum(**cfg["weighted_sum"]), "ser_head": SERHead(**cfg["ser_head"])}
    except (TypeError, ValueError) as e:
        raise DataError(f"{export_dir / 'downstream.json'}: invalid module configuration ({e})") from e
    load_downstream(export_dir, modules)
    encoder = FoldedEncoder(model, normalize_wav=bool(cfg["normalize_wav"]))
    return Recognizer(encoder, modules["weighted_sum"], modules["ser_head"], classes=cfg["classes"], device=device,
                      description=f"folded AdaLTM export {export_dir}")
