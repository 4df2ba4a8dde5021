#!/usr/bin/env python3
"""Write a model card (README.md) for a trained HarmoniFuse experiment folder.

    python recipes/MSP-Podcast/harmonifuse/model_card.py exp/harmonifuse/full/1986

The card holds the setup (speech encoder, text LM and how it was trained, prompts, both fusions), the test
metrics of ``metrics.json`` in % with their 95% bootstrap CIs (WER clean / other, UA, WA, MaF1, invalid SER
outputs), the learned fusion weights of ``fusion_weights.json`` per task, the plots found in the folder, and how
to run the model (``infer.py`` and the Python API).
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
              f"model, hparams = load_harmonifuse('{exp}')",
              "print(predict(model, hparams, ['clip.wav']))  # [{'file', 'transcript', 'emotion', ...}]", "```", "",
              "The base LM and WavLM are read from the sources above (only trained weights are in `save/`); "
              "pass `--lm_source` / `--wavlm_source` to `infer.py` when they moved.", ""]
    return "\n".join(lines)


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
