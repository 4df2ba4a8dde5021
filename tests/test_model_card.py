"""tools.model_card: the card of a recipe-trained AdaLTM experiment (fixture from test_infer) and hand-made metrics."""
import json
import re
import shutil

import pytest

try:  # the recipe-trained experiment of test_infer (built once per session, shared)
    from test_infer import adaltm_exp  # noqa: F401
except ImportError:  # pytest --import-mode=importlib
    from tests.test_infer import adaltm_exp  # noqa: F401
try:
    from fake_hub import record_uploads
except ImportError:  # pytest --import-mode=importlib
    from tests.fake_hub import record_uploads
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


# ----------------------------------------------------------------------------------------------------------------
# Hub metadata (huggingface_hub's ModelCard / ModelCardData, offline) and --push_to_hub
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_card_header_is_hub_metadata_with_the_metrics_and_cis(adaltm_exp, offline):  # noqa: F811
    from huggingface_hub import ModelCard

    exp, _, _ = adaltm_exp
    text = model_card(exp)
    assert text.startswith("---\n")
    data = ModelCard(text, ignore_metadata_errors=False).data  # the hub's own parser, no network
    assert (data.language, data.license, data.datasets) == ("en", "mit", ["MSP-Podcast"])  # from adaltm.yaml
    assert data.pipeline_tag == "audio-classification" and data.base_model is None  # W_base is a local folder here
    assert {"speech-emotion-recognition", "task-vectors", "wavlm"} <= set(data.tags)
    assert data.model_name == "Setup 4: Proposed Dual-Vector"
    test = json.loads((exp / "metrics.json").read_text())["test"]
    got = {r.metric_type: r for r in data.eval_results}
    assert sorted(got) == ["accuracy", "f1", "precision", "uar"] and data.metrics == sorted(got)
    assert got["accuracy"].metric_value == round(100 * test["accuracy"], 2) and "accuracy_ci" not in test
    assert (got["accuracy"].metric_name, got["accuracy"].metric_args) == ("Accuracy (WA) (%)", None)
    for key, metric in (("uar", "uar"), ("precision", "precision"), ("macro_f1", "f1")):
        r, ci = got[metric], test[f"{key}_ci"]
        assert r.metric_value == round(100 * test[key], 2)
        assert (r.metric_args["ci_low"], r.metric_args["ci_high"]) == (round(100 * ci[0], 2), round(100 * ci[1], 2))
        assert r.metric_args["num_bootstraps"] == 20 and r.metric_args["ci_level"] == 0.95
        assert f"95% CI [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" in r.metric_name
        assert (r.task_type, r.dataset_name, r.dataset_split) == ("audio-classification", "MSP-Podcast", "Test1")


def test_card_metadata_hand_computed(tmp_path):
    from lobes.errors import DataError
    from tools.model_card import card_metadata, hub_id

    (tmp_path / "models" / "wavlm").mkdir(parents=True)
    assert hub_id("microsoft/wavlm-large", tmp_path) == "microsoft/wavlm-large"
    assert hub_id("models/wavlm", tmp_path) is None  # a folder where training ran
    assert hub_id(str(tmp_path / "models" / "wavlm"), tmp_path) is None
    hp = {"language": "en", "license": "apache-2.0", "datasets": ["IEMOCAP"], "wavlm_source": "microsoft/wavlm-large",
          "test_splits": ["Test1", "Test2"], "modules": {}}
    metrics = {"test": {"uar": 0.61234, "uar_ci": [0.6, 0.625], "accuracy": 0.5, "ci_level": 0.9}, "wer": 0.2309}
    data = card_metadata(hp, "MTL", metrics, tmp_path, "mtl row")
    assert data.base_model == "microsoft/wavlm-large" and data.license == "apache-2.0"
    uar, acc, wer = data.eval_results
    assert (uar.metric_value, uar.metric_name, uar.metric_args["ci_level"]) == (61.23, "UAR (%, 90% CI [60.00, 62.50])",
                                                                               0.9)
    assert (acc.metric_value, acc.metric_name, acc.metric_args) == (50.0, "Accuracy (WA) (%)", None)
    assert (wer.task_type, wer.metric_type, wer.metric_value) == ("automatic-speech-recognition", "wer", 23.09)
    assert uar.dataset_split == "Test1, Test2" and data.tags[-2:] == ["multi-task", "ctc"]
    del hp["license"]
    with pytest.raises(DataError, match=r"hyperparams.yaml: lacks \['license'\]"):
        card_metadata(hp, "MTL", metrics, tmp_path, "mtl row")


def test_push_to_hub_only_with_the_option(adaltm_exp, tmp_path, monkeypatch, offline):  # noqa: F811
    """Without --push_to_hub nothing reaches the hub (the network is refused); with it, one commit holds the card,
    its plots and the export folder, and the card's snippets name the repo."""
    from tools.model_card import main

    exp, _, _ = adaltm_exp
    calls = record_uploads(monkeypatch)
    hf = tmp_path / "hf_export"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_wavlm_emotion.py"):
        (hf / name).write_text(f"{{}} {name}")
    assert main([str(exp), "--hf_export", str(hf)]) == 0
    assert calls == []
    assert main([str(exp), "--hf_export", str(hf), "--push_to_hub", "someone/ser-model"]) == 0
    assert calls[0] == ("create_repo", "someone/ser-model", {"repo_type": "model", "exist_ok": True})
    _, repo, files, message = calls[1]
    assert len(calls) == 2 and repo == "someone/ser-model" and message == f"Model card and export of {exp.name}"
    assert sorted(files) == ["README.md", "alphas.png", "config.json", "confusion.png", "lambdas.png",
                             "model.safetensors", "modeling_wavlm_emotion.py", "preprocessor_config.json"]
    assert files["README.md"] == (exp / "README.md").read_bytes() and files["config.json"] == b"{} config.json"
    card = (exp / "README.md").read_text()
    assert 'pipeline("audio-classification", model="someone/ser-model", trust_remote_code=True)' in card
    assert "library_name: transformers" in card


def test_upload_reads_files_in_place_without_a_staging_copy(tmp_path, monkeypatch):
    """A large export on another file system than the temp folder (hard links fail with EXDEV) where the temp folder
    has no room for a copy: the upload reads every file where it is. Old code staged hard links in a temp folder,
    fell back to a copy and failed with 'No space left on device'."""
    import errno
    import os

    from tools.model_card import upload_to_hub

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "card.md").write_text("# card")
    calls = record_uploads(monkeypatch)
    monkeypatch.setattr(os, "link", cross_device)
    for name in ("copyfile", "copy", "copy2", "copyfileobj"):
        monkeypatch.setattr(shutil, name, no_room)
    upload_to_hub("someone/big", {"README.md": tmp_path / "card.md", "lm/model.safetensors":
                                  tmp_path / "lm" / "model.safetensors"}, "big export")
    assert calls[1] == ("create_commit", "someone/big", {"README.md": b"# card", "lm/model.safetensors": b"w" * 1000},
                        "big export")
