"""Write a model card (README.md) for an experiment directory of the SER / AdaLTM / MTL / ASR-CTC recipes.

    python -m tools.model_card exp/adaltm/setup4_dual/1986 [--export exp/adaltm/setup4_dual/1986/folded_wavlm]

The card holds: the setup (Table-1 rows, W_base, task vectors, λ mode), the hparams that matter, the test
metrics of ``metrics.json`` in % with their 95% bootstrap CIs (UAR, precision, MaF1, accuracy; WER when present),
the learned λ / α and the plots found in the folder, and how to use the model: ``tools.infer``, the Python API, and
(for a folded AdaLTM export; default ``<EXP_DIR>/folded_wavlm`` when it exists) plain ``transformers`` code.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.metrics import read_metrics

# (key, meaning) of the hparams shown, in this order, when the experiment has them
HPARAMS = (
    ("wavlm_source", "W_base (HF hub id or local directory)"),
    ("lambda_mode", "λ granularity: fixed, global or layerwise"),
    ("lambda_init", "initial λ"),
    ("init_lambda", "λ of the static init W_base + λ Σ ΔW"),
    ("number_of_epochs", "epochs (best = lowest validation loss)"),
    ("batch_size", "batch size"),
    ("lr", "learning rate (head and α; λ in AdaLTM)"),
    ("lr_wavlm", "learning rate of the WavLM backbone"),
    ("loss_beta", "class-balanced loss β"),
    ("ser_weight", "SER loss weight"),
    ("ctc_weight", "CTC loss weight"),
    ("head_hidden", "emotion head hidden size"),
    ("pooling", "pooling over time"),
    ("precision", "training precision"),
    ("transcript_only", "utterances with transcripts only"),
    ("test_splits", "test split(s)"),
    ("num_bootstraps", "bootstrap resamples for the CIs"),
    ("speaker_bootstrap", "speaker-level bootstrap"),
    ("seed", "seed"),
)
METRICS = (("uar", "UAR"), ("precision", "Precision"), ("macro_f1", "MaF1"), ("accuracy", "Accuracy (WA)"))
PLOTS = (("lambdas.png", "λ per merge group"), ("alphas.png", "α per layer"), ("confusion.png", "test confusion"))
RECIPES = {
    "AdaLTM": "AdaLTM: frozen WavLM whose weights are W_base + Σ_k λ_k^(l) ΔW_k (eq. 4), α weighted layer sum "
              "(eq. 5) and an emotion head; λ, α and the head are trained",
    "MTL": "multi-task baseline: the whole WavLM fine-tuned with a joint CTC + SER loss",
    "SER": "WavLM fine-tuned for SER (α weighted layer sum + emotion head)",
    "ASR-CTC": "WavLM fine-tuned with a character CTC head",
}


def pct(value):
    """A fraction as a percentage with two decimals (``0.38945`` -> ``38.95``), as in the results table."""
    return f"{100 * float(value):.2f}"


def load_hparams_preview(exp_dir):
    """The saved ``hyperparams.yaml`` as plain data (tags kept as ruamel objects, nothing instantiated)."""
    import ruamel.yaml

    path = Path(exp_dir) / "hyperparams.yaml"
    try:
        return ruamel.yaml.YAML().load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise DataError(f"{path}: not found; is {exp_dir} an experiment directory?") from e
    except Exception as e:
        raise DataError(f"{path}: not valid YAML ({e})") from e


def _tag(node):
    return getattr(getattr(node, "tag", None), "value", None) or ""


def recipe_kind(hp):
    modules = hp.get("modules") or {}
    if "MergedWavLM" in _tag(hp.get("wavlm")):
        return "AdaLTM"
    if "ctc_head" in modules:
        return "MTL" if "ser_head" in modules else "ASR-CTC"
    return "SER"


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------
def setup_section(hp, kind, metrics):
    lines = ["## Setup", "", f"- Recipe: {RECIPES[kind]}."]
    rows = (metrics or {}).get("table_rows") or _plain(hp.get("table_rows")) or []
    if rows:
        lines.append("- Results-table rows: " + "; ".join(f"{r.get('part', '')} — **{r.get('row', '')}**"
                                                         for r in rows) + ".")
    if hp.get("experiment"):
        lines.append(f"- Experiment: `{hp['experiment']}`")
    lines.append(f"- Base model (W_base): `{hp.get('wavlm_source', '?')}` (relative paths here are relative to the "
                 "folder training ran from)")
    if kind == "AdaLTM":
        vectors = _plain(hp.get("task_vectors")) or {}
        if vectors:
            lines.append("- Task vectors (ΔW = W_ft − W_base): "
                         + ", ".join(f"{k} = `{v}`" for k, v in vectors.items()))
            lines.append(f"- λ mode: **{hp.get('lambda_mode')}** (init {hp.get('lambda_init')}); "
                         + ("λ fixed, not trained" if hp.get("lambda_mode") == "fixed" else "λ trained"))
        else:
            lines.append("- Task vectors: none (Setup 1: frozen W_base, no merging; α and head only)")
    elif kind == "MTL":
        vectors = _plain(hp.get("init_task_vectors")) or {}
        if vectors:
            lines.append(f"- Static init: W_base + {hp.get('init_lambda')} · ("
                         + " + ".join(f"ΔW_{k}" for k in vectors) + "), vectors "
                         + ", ".join(f"{k} = `{v}`" for k, v in vectors.items()))
        else:
            lines.append("- Initialised from W_base")
    return lines


def hparams_section(hp):
    lines = ["## Hyperparameters", "", "| hparam | value | meaning |", "|---|---|---|"]
    for key, meaning in HPARAMS:
        if key in hp and hp[key] is not None and not _tag(hp[key]):
            lines.append(f"| `{key}` | {hp[key]} | {meaning} |")
    return lines


def metrics_section(metrics, metrics_file):
    lines = ["## Test results", ""]
    if metrics is None:
        return lines + ["_No metrics.json: the test stage has not run._"]
    test = metrics.get("test") or {}
    level = test.get("ci_level", 0.95)
    unit = test.get("ci_unit")
    if test:
        lines.append(f"From `{metrics_file}`: {test.get('n', '?')} test utterances; values in %, "
                     f"{round(100 * level)}% percentile-bootstrap CIs"
                     + (f" ({test['num_bootstraps']} resamples" if "num_bootstraps" in test else "")
                     + (f", {unit} level" if unit else "") + (")" if "num_bootstraps" in test else "") + ".")
        lines += ["", f"| metric | value (%) | {round(100 * level)}% CI (%) |", "|---|---|---|"]
        for key, name in METRICS:
            if test.get(key) is None:
                continue
            ci = test.get(f"{key}_ci")
            ci_text = f"[{pct(ci[0])}, {pct(ci[1])}]" if ci else "–"
            lines.append(f"| {name} | {pct(test[key])} | {ci_text} |")
    if metrics.get("wer") is not None:
        if not test:
            lines += ["| metric | value (%) | CI (%) |", "|---|---|---|"]
        lines.append(f"| WER | {pct(metrics['wer'])} | – |")
    if not test and metrics.get("wer") is None:
        lines.append("_metrics.json holds no test metrics._")
    if test.get("classes"):
        lines += ["", f"Emotion classes ({len(test['classes'])}, in output order): " + ", ".join(test["classes"]) + "."]
    return lines


def coefficients_section(exp_dir, coeffs, metrics):
    lam = (coeffs or {}).get("lambda") or (metrics or {}).get("lambdas") or {}
    alpha = (coeffs or {}).get("alpha") or (metrics or {}).get("alphas") or []
    plots = [(f, t) for f, t in PLOTS if (Path(exp_dir) / f).is_file()]
    if not (lam or alpha or plots):
        return []
    lines = ["## Learned coefficients", ""]
    if lam:
        groups = (coeffs or {}).get("groups") or [f"g{i}" for i in range(len(next(iter(lam.values()))))]
        lines += ["λ per merge group (eq. 4):", "", "| vector | " + " | ".join(groups) + " |",
                  "|---|" + "---|" * len(groups)]
        lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in lam.items()]
        lines.append("")
    if alpha:
        lines += ["α per layer (eq. 5, softmax-normalised):", "", "| layer | " + " | ".join(
            str(i + 1) for i in range(len(alpha))) + " |", "|---|" + "---|" * len(alpha),
            "| α | " + " | ".join(f"{a:.3f}" for a in alpha) + " |", ""]
    for f, title in plots:
        lines += [f"![{title}]({f})", ""]
    return lines


def plain_transformers_snippet(export_rel):
    """Self-contained code (transformers + safetensors + torch) that reproduces ``lobes.inference`` on one file."""
    return f'''```python
import json

import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import WavLMModel

export_dir = "{export_rel}"
wav_path = "speech.wav"  # 16 kHz mono; resample / downmix other audio first (tools.infer does it for you)

wavlm = WavLMModel.from_pretrained(export_dir).eval()       # W_base + Σ_k λ_k ΔW_k, folded per group
head = load_file(f"{{export_dir}}/downstream.safetensors")  # α (weighted_sum.*) and the emotion head (ser_head.*)
cfg = json.load(open(f"{{export_dir}}/downstream.json"))


def linear(x, name):
    return x @ head[f"{{name}}.weight"].T + head[f"{{name}}.bias"]


wav = torch.tensor(sf.read(wav_path, dtype="float32")[0])[None]          # [1, samples]
wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)   # per-utterance normalisation, as in training
with torch.no_grad():
    hidden = torch.stack(wavlm(wav, output_hidden_states=True).hidden_states)  # [L+1, 1, T, D]
    if not cfg.get("include_cnn", False):
        hidden = hidden[1:]                                                  # the transformer layers' outputs
    if cfg.get("layer_norm", False):
        hidden = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:])
    alpha = torch.softmax(head["weighted_sum.weights"], dim=0)
    x = torch.einsum("l,lbtd->btd", alpha, hidden)                           # eq. (5): Σ_l α_l H^(l)
    n_proj = len({{k.split(".")[2] for k in head if k.startswith("ser_head.frame_proj.")}})
    for i in range(n_proj):                                                  # frame projection: Linear + ReLU
        x = torch.relu(linear(x, f"ser_head.frame_proj.{{3 * i}}"))
    pooled = x.mean(dim=1)
    if cfg["pooling"] == "mean_std":
        pooled = torch.cat([pooled, torch.sqrt(x.var(dim=1, unbiased=False) + 1e-6)], dim=-1)
    logits = linear(torch.relu(linear(pooled, "ser_head.classifier.0")), "ser_head.classifier.3")
    probs = torch.softmax(logits, dim=-1)[0]
print(dict(zip(cfg["classes"], probs.tolist())))
```'''


def usage_section(exp_dir, export_dir, kind):
    exp_dir = Path(exp_dir)
    lines = ["## How to use", "", "### Command line", "", "```bash",
             f"python -m tools.infer --model {exp_dir} --csv predictions.csv --json predictions.json "
             "clip1.wav folder_of_clips/"]
    if export_dir is not None:
        lines.append(f"python -m tools.infer --model {export_dir} --device cuda folder_of_clips/   # folded export")
    lines += ["```", "",
              "Any sample rate / channel count is accepted (downmixed and resampled to 16 kHz); folders are searched "
              "recursively for .wav/.flac/.ogg/.mp3. The table shows the predicted emotion and its probability"
              + (" and the CTC transcript" if kind in ("MTL", "ASR-CTC") else "")
              + "; the CSV / JSON hold one probability per class. Exit code 1 means some files could not be read "
              "(listed on stderr); the others were still predicted.", "",
              "### Python", "", "```python", "from tools.infer import load_model", "",
              f'model = load_model("{exp_dir}", device="cpu")  # the best (lowest validation loss) checkpoint',
              'for r in model.predict(["clip1.wav", "clip2.flac"]):',
              '    print(r["file"], r["emotion"], r["probs"], r["error"])', "```"]
    if kind == "AdaLTM":
        lines += ["", "Rebuilding from the experiment directory needs W_base and the task vectors named above; the "
                      "folded export needs neither."]
    if export_dir is not None:
        rel = os.path.relpath(export_dir, exp_dir)
        shown = rel if not rel.startswith("..") else str(Path(export_dir).resolve())
        lines += ["", "### Plain transformers (folded export)", "",
                  f"`{shown}` is a standard `WavLMModel` directory (λ baked into the weights) plus "
                  "`downstream.safetensors` / `downstream.json` (α and the emotion head) and `merge_info.json` "
                  "(λ per group). Without this toolkit (paths relative to this README):", "",
                  plain_transformers_snippet(shown)]
    elif (exp_dir / "finetuned_wavlm" / "config.json").is_file():
        lines += ["", "`finetuned_wavlm/` holds the fine-tuned backbone alone (`WavLMModel.from_pretrained`), "
                      "without the emotion head: the W_ft of a task vector."]
    return lines


def model_card(exp_dir, export_dir=None):
    """Markdown text of the model card of ``exp_dir`` (see the module docstring)."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: no such experiment directory")
    hp = load_hparams_preview(exp_dir)
    kind = recipe_kind(hp)
    metrics_file = exp_dir / "metrics.json"
    metrics = read_metrics(metrics_file) if metrics_file.exists() else None
    coeffs = _read_json(exp_dir / "coefficients.json")
    if export_dir is None and (exp_dir / "folded_wavlm" / "downstream.json").is_file():
        export_dir = exp_dir / "folded_wavlm"
    if export_dir is not None:
        export_dir = Path(export_dir)
        missing = [f for f in ("config.json", "downstream.json", "downstream.safetensors")
                   if not (export_dir / f).is_file()]
        if missing:
            raise DataError(f"{export_dir}: not a folded export (lacks {', '.join(missing)})")
    title = hp.get("experiment") or exp_dir.name
    rows = (metrics or {}).get("table_rows") or []
    lines = [f"# {rows[0]['row'] if rows and rows[0].get('row') else title}", "",
             f"Model card for `{exp_dir}` ({kind} recipe), written by `python -m tools.model_card`.", ""]
    for section in (setup_section(hp, kind, metrics), hparams_section(hp),
                    metrics_section(metrics, metrics_file.name), coefficients_section(exp_dir, coeffs, metrics),
                    usage_section(exp_dir, export_dir, kind)):
        if section:
            lines += section + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(exp_dir, export_dir=None):
    out = Path(exp_dir) / "README.md"
    text = model_card(exp_dir, export_dir)
    with atomic_write(out) as f:
        f.write(text)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp_dir", help="experiment directory (hyperparams.yaml, metrics.json, ...)")
    p.add_argument("--export", default=None, help="folded export directory (default: <exp_dir>/folded_wavlm if any)")
    a = p.parse_args(argv)
    try:
        print(write_model_card(a.exp_dir, a.export))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
