#!/usr/bin/env python3
"""Write a model card (README.md) for a trained HarmoniFuse experiment folder.

    python recipes/MSP-Podcast/harmonifuse/model_card.py exp/harmonifuse/full/1986

The card holds the setup (speech encoder, text LM and how it was trained, prompts, both fusions), the test
metrics of ``metrics.json`` in % with their 95% bootstrap CIs (WER clean / other, UA, WA, MaF1, invalid SER
outputs), the learned fusion weights of ``fusion_weights.json`` per task, the plots found in the folder, and how
to run the model (``infer.py`` and the Python API). :func:`export_card` is the card of an export of
``tools/export_harmonifuse.py``: hub metadata (``huggingface_hub.ModelCardData``) and its loading snippet.
"""
import argparse
import json
import sys
from pathlib import Path

SETUP = (("wavlm_source", "speech encoder"), ("freeze_wavlm", "encoder frozen"), ("lm_source", "text LM"),
         ("lm_mode", "LM training: frozen | lora | full"), ("lora_rank", "LoRA rank"), ("lora_alpha", "LoRA α"),
         ("lora_target_modules", "LoRA target modules"), ("lm_dtype", "LM weight dtype"),
         ("prompt_mode", "task prompts: text | soft"), ("task_prompts", "prompt words"),
         ("encoder_gate", "encoder fusion gate (none = softmax layer sum)"), ("fixed_layer", "fixed encoder layer"),
         ("lm_fusion", "LM-layer fusion"), ("ser_mode", "SER output"), ("train_tasks", "tasks trained"),
         ("interleave_ratio", "batches per task per round"), ("number_of_epochs", "epochs"),
         ("num_beams", "beams at decoding"), ("seed", "seed"))
METRICS = (("WER test-clean", "wer_clean", None), ("WER test-other", "wer_other", None),
           ("UA (unweighted accuracy)", "uar", "test"), ("WA (accuracy)", "accuracy", "test"),
           ("macro-F1", "macro_f1", "test"))


def _fmt(v):
    return ", ".join(str(x) for x in v) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else str(v)


def model_card(exp_dir):
    import ruamel.yaml

    exp = Path(exp_dir)
    hp_file, m_file = exp / "hyperparams.yaml", exp / "metrics.json"
    for f in (hp_file, m_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; is {exp} a tested HarmoniFuse experiment folder?")
    class _TagsAsNone(ruamel.yaml.constructor.SafeConstructor):
        """!new:/!ref/... values read as None. A subclass: ruamel registers constructors per class, and adding
        this to SafeConstructor itself would turn every later hyperpyyaml object in the process into None."""

    _TagsAsNone.add_multi_constructor("!", lambda loader, suffix, node: None)
    reader = ruamel.yaml.YAML(typ="safe", pure=True)
    reader.Constructor = _TagsAsNone
    hp = reader.load(hp_file.read_text()) or {}
    m = json.loads(m_file.read_text())
    lines = [f"# HarmoniFuse speech LM: {m.get('experiment', exp.name)}", "",
             "One speech language model for ASR (transcript) and SER (emotion word), trained batch-interleaved "
             "(recipe `recipes/MSP-Podcast/harmonifuse`).", "", "## Setup", "", "| setting | value |", "|---|---|"]
    for key, meaning in SETUP:
        if hp.get(key) is not None:
            lines.append(f"| {meaning} (`{key}`) | {_fmt(hp[key])} |")
    lines += ["", "## Test metrics (%, ± half-width of the 95% bootstrap CI)", "", "| metric | value |", "|---|---|"]
    for name, key, section in METRICS:
        src = m.get(section, {}) if section else m
        if src.get(key) is not None:
            ci = src.get(f"{key}_ci")
            half = f" ± {100 * (ci[1] - ci[0]) / 2:.2f}" if ci else ""
            lines.append(f"| {name} | {100 * src[key]:.2f}{half} |")
    if "test" in m:
        lines.append(f"| invalid SER outputs (not a class name) | {m['test'].get('n_invalid', 0)} of {m['test']['n']} |")
    fw_file = exp / "fusion_weights.json"
    if fw_file.is_file():
        fw = json.loads(fw_file.read_text())
        first = fw.get("encoder_first_layer", 1)
        lines += ["", f"## Learned fusion weights ({fw.get('encoder_fusion')}; LM fusion {fw.get('lm_fusion')})", "",
                  "| task | encoder α per layer (from layer %d) | mean LM-layer α on the test set |" % first,
                  "|---|---|---|"]
        for t in fw.get("tasks", []):
            enc = " ".join(f"{x:.2f}" for x in fw["encoder"][t])
            lm = fw["lm_dynamic_mean"].get(t)
            lines.append(f"| {t} | {enc} | {' '.join(f'{x:.2f}' for x in lm) if lm else '-'} |")
    plots = [p.name for p in sorted(exp.glob("*.png"))]
    if plots:
        lines += ["", "## Plots", ""] + [f"- ![{p}]({p})" for p in plots]
    lines += ["", "## Use", "", "```bash",
              f"python recipes/MSP-Podcast/harmonifuse/infer.py --model {exp} clips/ --json predictions.json", "```",
              "", "```python", "import sys; sys.path.insert(0, 'recipes/MSP-Podcast/harmonifuse')",
              "from infer import load_harmonifuse, predict",
              f"model, decoding = load_harmonifuse('{exp}')",
              "print(predict(model, decoding, ['clip.wav']))  # [{'file', 'transcript', 'emotion', 'scores', ...}]",
              "```", "",
              "The trained weights are in `speech_modules.safetensors` and `lm_adapter/` (LoRA) or `lm/` (full LM); "
              "a base LM or frozen WavLM is read from the source above: pass `--lm_source` / `--wavlm_source` to "
              "`infer.py` when it moved. `python -m tools.export_harmonifuse` writes a self-contained copy.", ""]
    return "\n".join(lines)


EXPORT_SNIPPET = """\
from lobes.harmonifuse.artefacts import load_artefacts
from lobes.harmonifuse.predict import predict

model, info = load_artefacts("{folder}")  # lm_source="..." if lm/ moved
print(predict(model, info["decoding"], ["speech.wav"]))  # [{{'file', 'transcript', 'emotion', 'scores', ...}}]
"""


def export_section(folder_name):
    """How to load an export of tools/export_harmonifuse.py: its files and the snippet (run by a test)."""
    return ["## Load this export", "",
            "`lm/`: the LM with the LoRA adapters merged (`merge_and_unload`; transformers `save_pretrained`, with "
            "its tokenizer); `speech_modules.safetensors`: WavLM, encoder fusion, adapter, LM-layer "
            "fusion, prompts, heads; `speech_modules.json`: how to rebuild the model and decode as the experiment's "
            "test did. The model's code is this toolkit's `lobes` package (on the Python path); run from the folder "
            "holding this export:", "", "```python", EXPORT_SNIPPET.format(folder=folder_name).rstrip(), "```", ""]


def export_card(exp_dir, export_dir):
    """The export's README.md: hub metadata (huggingface_hub ``ModelCardData``, parsed back as tools/model_card.py
    does) + the experiment's card with the export's loading section instead of the experiment's use."""
    from huggingface_hub import ModelCardData

    from lobes.errors import DataError
    from tools.model_card import _eval_results, hub_id, load_hparams_preview, with_header

    hp = load_hparams_preview(exp_dir)
    missing = [k for k in ("language", "license", "datasets") if hp.get(k) in (None, "", [])]
    if missing:
        raise DataError(f"{Path(exp_dir) / 'hyperparams.yaml'}: lacks {missing}, the card's hub metadata")
    metrics = json.loads((Path(exp_dir) / "metrics.json").read_text())
    datasets = [str(d) for d in hp["datasets"]]
    # SER metrics on the SER corpus (the last dataset), WER on LibriSpeech (the first)
    results = _eval_results({k: v for k, v in metrics.items() if k != "wer"}, datasets[-1],
                            ", ".join(str(s) for s in hp.get("test_splits") or ["test"]))
    if metrics.get("wer") is not None:
        results += _eval_results({"wer": metrics["wer"]}, datasets[0], str(metrics.get("wer_split", "test")))
    data = ModelCardData(
        model_name=f"HarmoniFuse {metrics.get('experiment', '')}".strip(), language=str(hp["language"]),
        license=str(hp["license"]), datasets=datasets, base_model=hub_id(hp.get("lm_source"), Path.cwd()),
        pipeline_tag="automatic-speech-recognition", tags=["harmonifuse", "speech-llm", "wavlm", "peft",
                                                            "speech-emotion-recognition"],
        metrics=sorted({r.metric_type for r in results}) or None, eval_results=results or None)
    body = model_card(exp_dir).split("## Use\n", 1)[0]
    return with_header(data, body + "\n".join(export_section(Path(export_dir).name)), Path(export_dir) / "README.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp_dir")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from lobes.io_utils import atomic_write

    text = model_card(a.exp_dir)
    with atomic_write(Path(a.exp_dir) / "README.md") as f:
        f.write(text)
    print(Path(a.exp_dir) / "README.md")


if __name__ == "__main__":
    main()
