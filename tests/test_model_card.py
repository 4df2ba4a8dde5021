"""tools.model_card: the card of a recipe-trained AdaLTM experiment (fixture from test_infer) and hand-made metrics."""
import json
import re
import shutil

import pytest

try:  # the recipe-trained experiment of test_infer (built once per session, shared)
    from test_infer import adaltm_exp  # noqa: F401
except ImportError:  # pytest --import-mode=importlib
    from tests.test_infer import adaltm_exp  # noqa: F401
from tools.model_card import metrics_section, model_card, write_model_card

METRIC_NAMES = {"uar": "UAR", "precision": "Precision", "macro_f1": "MaF1", "accuracy": "Accuracy (WA)"}


def _metric_rows(text):
    return [line for line in text.splitlines() if re.match(r"\| (UAR|Precision|MaF1|Accuracy \(WA\)|WER) \|", line)]


def test_metrics_section_hand_computed():
    metrics = {"test": {"uar": 0.3894, "uar_ci": [0.3831, 0.3957], "precision": 0.2552, "precision_ci": [0.25, 0.26],
                        "macro_f1": 0.1, "macro_f1_ci": [0.0925, 0.1075], "accuracy": 0.5, "n": 46366},
               "wer": 0.2309}
    rows = _metric_rows("\n".join(metrics_section(metrics, "metrics.json")))
    assert rows == ["| UAR | 38.94 | [38.31, 39.57] |", "| Precision | 25.52 | [25.00, 26.00] |",
                    "| MaF1 | 10.00 | [9.25, 10.75] |", "| Accuracy (WA) | 50.00 | – |", "| WER | 23.09 | – |"]


def test_card_lists_exactly_the_metrics_of_metrics_json(adaltm_exp, tmp_path):  # noqa: F811
    exp, _, _ = adaltm_exp
    out = write_model_card(exp)
    text = out.read_text()
    assert out == exp / "README.md"
    test = json.loads((exp / "metrics.json").read_text())["test"]
    expected = []
    for key, name in METRIC_NAMES.items():
        ci = test.get(f"{key}_ci")
        ci_text = f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "–"
        expected.append(f"| {name} | {100 * test[key]:.2f} | {ci_text} |")
    assert _metric_rows(text) == expected  # no WER row: this experiment has no CTC head
    assert f"{test['n']} test utterances" in text
    # setup: row name, task vectors and λ mode of the run; plots that exist are linked
    assert "**Setup 4: Proposed Dual-Vector**" in text and "λ mode: **layerwise**" in text
    assert "asr_in.safetensors" in text and "ser.safetensors" in text
    for png in ("lambdas.png", "alphas.png", "confusion.png"):
        assert f"]({png})" in text
    assert "python -m tools.infer --model" in text


def test_card_snippet_runs_with_plain_transformers(adaltm_exp, tmp_path):  # noqa: F811
    """The card's plain-transformers code, run as written on one file, gives lobes.inference's probabilities."""
    from tools.infer import load_model

    exp, files, _ = adaltm_exp
    text = model_card(exp)
    code = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    assert 'export_dir = "folded_wavlm"' in code
    assert "lobes" not in code  # plain transformers + safetensors + torch
    code = code.replace('export_dir = "folded_wavlm"', f'export_dir = "{exp / "folded_wavlm"}"')
    code = code.replace('wav_path = "speech.wav"', f'wav_path = "{files[0]}"')
    namespace = {"print": lambda *a, **k: None}
    exec(compile(code, "model_card_snippet", "exec"), namespace)
    want = load_model(exp / "folded_wavlm").predict([files[0]], progress=False)[0]["probs"]
    assert [float(p) for p in namespace["probs"]] == pytest.approx(list(want.values()), abs=1e-5)


def test_card_without_metrics_or_export(adaltm_exp, tmp_path):  # noqa: F811
    exp, _, _ = adaltm_exp
    copy = tmp_path / "exp"
    copy.mkdir()
    shutil.copy(exp / "hyperparams.yaml", copy / "hyperparams.yaml")
    text = model_card(copy)
    assert "_No metrics.json" in text and _metric_rows(text) == []
    assert "Plain transformers" not in text
