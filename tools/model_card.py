"""Write a model card (README.md) for an experiment directory of the SER / AdaLTM / MTL / ASR-CTC recipes.

    python -m tools.model_card exp/adaltm/setup4_dual/1986 [--export exp/adaltm/setup4_dual/1986/folded_wavlm]
    python -m tools.model_card exp/adaltm/setup4_dual/1986 --hf_export exp/.../hf_export --push_to_hub me/ser-model

The card starts with the hub's metadata header, built with ``huggingface_hub.ModelCardData`` and parsed back with
``ModelCard`` before writing (offline; ``ModelCard.validate`` would ask the hub): ``language``, ``license`` and
``datasets`` from the experiment's YAML, ``base_model`` (``wavlm_source`` when it is a hub id), tags, the pipeline
task, and ``model-index`` results: every test metric of ``metrics.json`` in % with its bootstrap CI (in the
metric's name and, as numbers, in its ``args``). The network is used only with ``--push_to_hub REPO``: one commit
to the hub model repository REPO (created if missing) with the card as README.md, the plots it links and, with
``--hf_export`` (default ``<EXP_DIR>/hf_export`` when it exists, written by ``tools.export_hf``), the exported
model, so ``pipeline("audio-classification", model=REPO, trust_remote_code=True)`` works; for an ASR-CTC
experiment, its ``finetuned_wavlm/`` (a ``WavLMForCTC`` with its processor), so
``pipeline("automatic-speech-recognition", model=REPO)`` works. It needs a hub token (``huggingface-cli login`` or
``HF_TOKEN``). The upload is :func:`upload_to_hub`, shared with ``tools.export_harmonifuse --push_to_hub``.

The card holds: the setup (Table-1 rows, W_base, task vectors, λ mode), the hparams that matter, the test
metrics of ``metrics.json`` in % with their 95% bootstrap CIs (UAR, precision, MaF1, accuracy; WER when present),
the learned λ / α and the plots found in the folder, and how to use the model: ``tools.infer``, the Python API, and
(for a folded AdaLTM export; default ``<EXP_DIR>/folded_wavlm`` when it exists) plain ``transformers`` code; for an
ASR-CTC experiment, whose ``finetuned_wavlm/`` is a ``WavLMForCTC`` with its processor (``lobes.ctc_export``), a
``pipeline("automatic-speech-recognition", ...)`` snippet.
"""
import argparse
import json
import os
import re
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
METRIC_IDS = {"uar": "uar", "precision": "precision", "macro_f1": "f1", "accuracy": "accuracy"}
TAGS = {"AdaLTM": ["task-vectors", "model-merging"], "MTL": ["multi-task", "ctc"], "SER": [], "ASR-CTC": ["ctc"]}
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
# Hub metadata
# ----------------------------------------------------------------------------------------------------------------
def hub_id(source, root):
    """``source`` when it names a hub repository (``owner/name`` and no such folder under ``root``), else None."""
    source = str(source or "")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not (Path(root) / source).exists():
        return source
    return None


def _eval_results(metrics, dataset, split):
    """``EvalResult`` per test metric of metrics.json: value in %, CI in the name and in ``metric_args``."""
    from huggingface_hub import EvalResult

    test, out = (metrics or {}).get("test") or {}, []
    common = {"dataset_type": dataset, "dataset_name": dataset, "dataset_split": split}
    level = round(100 * test.get("ci_level", 0.95))
    for key, name in METRICS:
        if test.get(key) is None:
            continue
        ci = test.get(f"{key}_ci")
        args = {"ci_low": float(pct(ci[0])), "ci_high": float(pct(ci[1])), "ci_level": level / 100,
                "num_bootstraps": test.get("num_bootstraps")} if ci else None
        label = f"{name} (%, {level}% CI [{pct(ci[0])}, {pct(ci[1])}])" if ci else f"{name} (%)"
        out.append(EvalResult(task_type="audio-classification", task_name="Speech emotion recognition",
                              metric_type=METRIC_IDS[key], metric_value=float(pct(test[key])), metric_name=label,
                              metric_args=args, **common))
    if (metrics or {}).get("wer") is not None:
        out.append(EvalResult(task_type="automatic-speech-recognition", task_name="Speech recognition",
                              metric_type="wer", metric_value=float(pct(metrics["wer"])), metric_name="WER (%)",
                              **common))
    return out


def card_metadata(hp, kind, metrics, exp_dir, model_name, transformers_export=False):
    """The card's ``ModelCardData``; DataError naming hyperparams.yaml when it lacks language / license /
    datasets (the base YAMLs declare them)."""
    from huggingface_hub import ModelCardData

    from lobes.inference import training_root

    missing = [k for k in ("language", "license", "datasets") if hp.get(k) in (None, "", [])]
    if missing:
        raise DataError(f"{Path(exp_dir) / 'hyperparams.yaml'}: lacks {missing}, the model card's hub metadata "
                        "(declared in every base YAML; add them to an older experiment's file)")
    datasets = [str(d) for d in _plain(hp["datasets"])] if not isinstance(hp["datasets"], str) else [hp["datasets"]]
    splits = _plain(hp.get("test_splits")) or ["test"]
    ser = kind != "ASR-CTC"
    base = hub_id(hp.get("wavlm_source"), training_root(exp_dir, hp.get("output_folder")))
    results = _eval_results(metrics, datasets[0], ", ".join(map(str, splits)))
    return ModelCardData(
        model_name=model_name, language=str(hp["language"]), license=str(hp["license"]), datasets=datasets,
        base_model=base, library_name="transformers" if transformers_export else None,
        pipeline_tag="audio-classification" if ser else "automatic-speech-recognition",
        tags=["speechbrain", "wavlm"] + (["speech-emotion-recognition"] if ser else ["asr"]) + TAGS[kind],
        metrics=sorted({r.metric_type for r in results}) or None, eval_results=results or None)


def with_header(data, body, where):
    """``---`` YAML header + body, parsed back by huggingface_hub (no network) so the hub reads what we wrote."""
    from huggingface_hub import ModelCard

    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    try:
        parsed = ModelCard(text, ignore_metadata_errors=False).data
    except ValueError as e:
        raise DataError(f"{where}: the model card's metadata does not parse ({e})") from e
    if (parsed.eval_results or []) != (data.eval_results or []):
        raise DataError(f"{where}: the model card's results changed when parsed back")
    return text


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


def asr_pipeline_snippet(export_rel):
    """Code that transcribes one file with ``transformers.pipeline`` from an ASR-CTC export (``lobes.ctc_export``)."""
    return f'''```python
import soundfile as sf
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{export_rel}")  # WavLMForCTC + its processor
samples, rate = sf.read("speech.wav", dtype="float32")  # 16 kHz mono; a file path works too where ffmpeg is installed
print(asr({{"raw": samples, "sampling_rate": rate}})["text"])
```'''


def _is_ctc_export(folder):
    """An ``export_ctc_model`` folder: a WavLMForCTC config with the tokenizer and feature-extractor files."""
    needed = ("config.json", "vocab.json", "tokenizer_config.json", "preprocessor_config.json")
    if not all((folder / f).is_file() for f in needed):
        return False
    return "WavLMForCTC" in (_read_json(folder / "config.json") or {}).get("architectures", [])


def _infer_lines(exp_dir, export_dir, kind):
    asr_only = kind == "ASR-CTC"
    lines = ["### Command line", "", "```bash",
             f"python -m tools.infer --model {exp_dir} --csv predictions.csv --json predictions.json "
             "clip1.wav folder_of_clips/"]
    if export_dir is not None:
        lines.append(f"python -m tools.infer --model {export_dir} --device cuda folder_of_clips/   # folded export")
    shows = ("the CTC transcript of each file" if asr_only else "the predicted emotion and its probability"
             + (" and the CTC transcript" if kind == "MTL" else "") + "; the CSV / JSON hold one probability per class")
    return lines + ["```", "",
                    "Any sample rate / channel count is accepted (downmixed and resampled to 16 kHz); folders are "
                    f"searched recursively for .wav/.flac/.ogg/.mp3. The table shows {shows}. Exit code 1 means some "
                    "files could not be read (listed on stderr); the others were still predicted.", "",
                    "### Python", "", "```python", "from tools.infer import load_model", "",
                    f'model = load_model("{exp_dir}", device="cpu")  # the best (lowest validation loss) checkpoint',
                    'for r in model.predict(["clip1.wav", "clip2.flac"]):',
                    '    print(r["file"], r["transcript"], r["error"])' if asr_only else
                    '    print(r["file"], r["emotion"], r["probs"], r["error"])', "```"]


def usage_section(exp_dir, export_dir, kind, repo=None):
    exp_dir = Path(exp_dir)
    lines = ["## How to use", "", *_infer_lines(exp_dir, export_dir, kind)]
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
    elif _is_ctc_export(exp_dir / "finetuned_wavlm"):
        lines += ["", "### transformers pipeline", "",
                  "`finetuned_wavlm/` is a `WavLMForCTC` with its processor (`Wav2Vec2CTCTokenizer` over the "
                  "recipe's characters, `Wav2Vec2FeatureExtractor` normalising as training did): "
                  "`pipeline(\"automatic-speech-recognition\")` decodes greedily as the recipe does. Its `wavlm.*` "
                  "weights are the fine-tuned backbone alone, the W_ft of a task vector (`WavLMModel.from_pretrained` "
                  "reads them and drops the CTC head). Without this toolkit"
                  + (f" (the hub repo `{repo}` holds these files):" if repo else " (paths relative to this README):"),
                  "", asr_pipeline_snippet(repo or "finetuned_wavlm")]
    elif (exp_dir / "finetuned_wavlm" / "config.json").is_file():
        lines += ["", "`finetuned_wavlm/` holds the fine-tuned backbone alone (`WavLMModel.from_pretrained`), "
                      "without the emotion head: the W_ft of a task vector."]
    return lines


def hf_export_section(hf_export, exp_dir, repo=None):
    """How transformers and SpeechBrain users load the ``tools.export_hf`` folder (or the hub repo ``repo``)."""
    ref = repo or os.path.relpath(hf_export, exp_dir)
    return ["### transformers and SpeechBrain", "",
            f"`{ref}` (written by `python -m tools.export_hf`) loads offline with either library; it ships its own "
            "model code (`modeling_wavlm_emotion.py`: WavLM, α layer sum, emotion head) and a feature extractor that "
            "normalises as training did. Input: 16 kHz mono.", "", "```python",
            "from transformers import pipeline", "",
            f'classify = pipeline("audio-classification", model="{ref}", trust_remote_code=True)',
            'print(classify({"raw": waveform, "sampling_rate": 16000}, top_k=None))  # or a file path, with ffmpeg', "",
            "from speechbrain.inference.interfaces import foreign_class", "",
            f'classifier = foreign_class(source="{ref}", pymodule_file="custom_interface.py", '
            'classname="EmotionClassifier")',
            'out_prob, score, index, label = classifier.classify_file("speech.wav")', "```"]


def _checked_exports(exp_dir, export_dir, hf_export):
    """(folded export, tools.export_hf folder), defaults found in ``exp_dir``; DataError for a wrong folder."""
    if export_dir is None and (exp_dir / "folded_wavlm" / "downstream.json").is_file():
        export_dir = exp_dir / "folded_wavlm"
    if hf_export is None and (exp_dir / "hf_export" / "modeling_wavlm_emotion.py").is_file():
        hf_export = exp_dir / "hf_export"
    for folder, kind, needed in ((export_dir, "folded export", ("config.json", "downstream.json",
                                                                "downstream.safetensors")),
                                 (hf_export, "tools.export_hf folder", ("config.json", "model.safetensors",
                                                                        "preprocessor_config.json"))):
        missing = [f for f in needed if folder is not None and not (Path(folder) / f).is_file()]
        if missing:
            raise DataError(f"{folder}: not a {kind} (lacks {', '.join(missing)})")
    return (None if export_dir is None else Path(export_dir)), (None if hf_export is None else Path(hf_export))


def model_card(exp_dir, export_dir=None, hf_export=None, repo=None):
    """Markdown text of the model card of ``exp_dir``, hub metadata header first (see the module docstring)."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: no such experiment directory")
    hp = load_hparams_preview(exp_dir)
    kind = recipe_kind(hp)
    metrics_file = exp_dir / "metrics.json"
    metrics = read_metrics(metrics_file) if metrics_file.exists() else None
    coeffs = _read_json(exp_dir / "coefficients.json")
    export_dir, hf_export = _checked_exports(exp_dir, export_dir, hf_export)
    rows = (metrics or {}).get("table_rows") or []
    title = rows[0]["row"] if rows and rows[0].get("row") else (hp.get("experiment") or exp_dir.name)
    lines = [f"# {title}", "", f"Model card for `{exp_dir}` ({kind} recipe), written by `python -m tools.model_card`.",
             ""]
    usage = usage_section(exp_dir, export_dir, kind, repo) + (
        ["", *hf_export_section(hf_export, exp_dir, repo)] if hf_export is not None else [])
    for section in (setup_section(hp, kind, metrics), hparams_section(hp),
                    metrics_section(metrics, metrics_file.name), coefficients_section(exp_dir, coeffs, metrics),
                    usage):
        if section:
            lines += section + [""]
    transformers_export = hf_export is not None or (kind == "ASR-CTC" and _is_ctc_export(exp_dir / "finetuned_wavlm"))
    data = card_metadata(hp, kind, metrics, exp_dir, title, transformers_export=transformers_export)
    return with_header(data, "\n".join(lines).rstrip() + "\n", exp_dir / "hyperparams.yaml")


def write_model_card(exp_dir, export_dir=None, hf_export=None, repo=None):
    out = Path(exp_dir) / "README.md"
    text = model_card(exp_dir, export_dir, hf_export, repo)
    with atomic_write(out) as f:
        f.write(text)
    return out


def upload_to_hub(repo, files, commit_message):
    """One commit of ``files`` ({path in the repo: local file}) to the hub model repo ``repo`` (created if missing):
    ``HfApi.create_repo`` + ``create_commit`` with one ``CommitOperationAdd`` per file, read from where it is (no
    staging copy: an export holds an LLM of many GB, and a temp folder on another file system, or tmpfs, would take
    a full copy of it). The one function of the toolkit that uploads; the model card and the HarmoniFuse export use
    it."""
    from huggingface_hub import CommitOperationAdd, HfApi

    missing = [str(p) for p in files.values() if not Path(p).is_file()]
    if missing:
        raise DataError(f"upload to {repo}: files not found: {missing[:5]}")
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    return api.create_commit(repo, ops, commit_message=commit_message, repo_type="model")


def hub_files(exp_dir, card_file, export=None):
    """{path in the repo: file} of an experiment's upload: the card as README.md, the plots it links, and the files
    of ``export`` (a ``tools.export_hf`` folder, or an ASR-CTC experiment's ``finetuned_wavlm/``) at the root."""
    files = {"README.md": Path(card_file)}
    files.update({f: Path(exp_dir) / f for f, _ in PLOTS if (Path(exp_dir) / f).is_file()})
    if export is not None:
        files.update({p.name: p for p in sorted(Path(export).iterdir()) if p.is_file() and p.name != "README.md"})
    return files


def push_to_hub(repo, exp_dir, card_file, export=None):
    """Upload :func:`hub_files` as one commit (:func:`upload_to_hub`)."""
    return upload_to_hub(repo, hub_files(exp_dir, card_file, export),
                         f"Model card and export of {Path(exp_dir).name}")


def upload_export(exp_dir, export_dir, hf_export):
    """The folder an upload of ``exp_dir`` ships: the ``tools.export_hf`` folder, else an ASR-CTC experiment's
    ``finetuned_wavlm/`` (a WavLMForCTC with its processor), else None (card and plots only)."""
    _, hf_export = _checked_exports(Path(exp_dir), export_dir, hf_export)
    ctc = Path(exp_dir) / "finetuned_wavlm"
    return hf_export if hf_export is not None else (ctc if _is_ctc_export(ctc) else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp_dir", help="experiment directory (hyperparams.yaml, metrics.json, ...)")
    p.add_argument("--export", default=None, help="folded export directory (default: <exp_dir>/folded_wavlm if any)")
    p.add_argument("--hf_export", default=None,
                   help="tools.export_hf folder (default: <exp_dir>/hf_export if any): shown in the card, pushed")
    p.add_argument("--push_to_hub", metavar="REPO", default=None,
                   help="upload the card (+ plots, + --hf_export or an ASR-CTC experiment's finetuned_wavlm/) "
                   "to this hub model repo, one commit; needs a hub token")
    a = p.parse_args(argv)
    try:
        out = write_model_card(a.exp_dir, a.export, a.hf_export, a.push_to_hub)
        print(out)
        if a.push_to_hub:
            print(push_to_hub(a.push_to_hub, a.exp_dir, out, upload_export(a.exp_dir, a.export, a.hf_export)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
