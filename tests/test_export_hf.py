"""tools.export_hf: the folder loads offline in transformers (AutoModel, pipeline) and SpeechBrain (foreign_class)
and predicts what the toolkit predicts, on the recipe-trained AdaLTM experiment of test_infer and a hand-made MTL one.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

try:  # the recipe-trained experiment of test_infer (built once per session, shared)
    from test_infer import _mtl_experiment, adaltm_exp  # noqa: F401
except ImportError:  # pytest --import-mode=importlib
    from tests.test_infer import _mtl_experiment, adaltm_exp  # noqa: F401
from lobes.errors import DataError
from tools.export_hf import export_hf
from tools.infer import load_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]



@pytest.fixture(scope="module")
def hf_export(adaltm_exp, tmp_path_factory):  # noqa: F811
    """The CLI's export of the AdaLTM experiment directory (λ folded at export time)."""
    exp, files, _ = adaltm_exp
    out = tmp_path_factory.mktemp("hf") / "export"
    proc = subprocess.run([sys.executable, "-m", "tools.export_hf", str(exp), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _pipeline_probs(classify, files):
    out = []
    for f in files:
        wav, sr = sf.read(f, dtype="float32")
        out.append({d["label"]: d["score"] for d in classify({"raw": wav, "sampling_rate": sr}, top_k=None)})
    return out


def test_transformers_loads_the_export_offline_and_predicts_as_tools_infer(adaltm_exp, hf_export, offline):  # noqa: F811
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, pipeline

    exp, files, _ = adaltm_exp
    assert sorted(p.name for p in hf_export.iterdir()) == [
        "config.json", "custom_interface.py", "hyperparams.yaml", "model.safetensors", "modeling_wavlm_emotion.py",
        "preprocessor_config.json"]
    config = json.loads((hf_export / "config.json").read_text())
    assert config["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}  # the recipe's emotion_classes
    assert config["auto_map"]["AutoModelForAudioClassification"] == \
        "modeling_wavlm_emotion.WavLMForEmotionClassification"
    assert config["model_type"] == "wavlm_emotion"
    assert config["layer_sum"] == {"include_cnn": False, "layer_norm": False}
    assert config["emotion_head"] == {"hidden_size": 16, "pooling": "mean", "dropout": 0.1, "num_proj_layers": 1,
                                      "head_type": "frame_mlp"}
    extractor = AutoFeatureExtractor.from_pretrained(hf_export)
    assert type(extractor).__name__ == "Wav2Vec2FeatureExtractor"
    assert (extractor.do_normalize, extractor.sampling_rate, extractor.return_attention_mask) == (True, 16000, True)
    model = AutoModelForAudioClassification.from_pretrained(hf_export, trust_remote_code=True)
    assert type(model).__name__ == "WavLMForEmotionClassification"
    # the export's α is the experiment's (softmax of the same logits)
    exp_model = load_model(exp)
    assert torch.allclose(model.layer_weights, exp_model.modules["weighted_sum"].weights, atol=0)

    want = exp_model.predict(files[:4], progress=False)
    got = _pipeline_probs(pipeline("audio-classification", model=str(hf_export), trust_remote_code=True), files[:4])
    for g, w in zip(got, want):
        assert set(g) == set(CLASSES)
        assert max(g, key=g.get) == w["emotion"]
        assert max(abs(g[c] - w["probs"][c]) for c in CLASSES) < 1e-5
    assert max(abs(got[0][c] - got[1][c]) for c in CLASSES) > 1e-3  # files differ far more than the tolerance


def test_speechbrain_foreign_class_loads_the_export_offline(adaltm_exp, hf_export, tmp_path, offline):  # noqa: F811
    from speechbrain.inference.interfaces import foreign_class

    exp, files, _ = adaltm_exp
    want = load_model(exp).predict(files[:3], progress=False)
    for savedir in (None, tmp_path / "sb"):  # straight from the folder, and through SpeechBrain's symlinked savedir
        classifier = foreign_class(source=str(hf_export), pymodule_file="custom_interface.py",
                                   classname="EmotionClassifier", savedir=savedir)
        for f, w in zip(files[:3], want):
            out_prob, score, index, label = classifier.classify_file(f)
            assert label == [w["emotion"]] and CLASSES[int(index)] == w["emotion"]
            assert out_prob.shape == (1, 8)
            assert torch.allclose(out_prob[0], torch.tensor([w["probs"][c] for c in CLASSES]), atol=1e-5, rtol=0)
            assert float(score) == pytest.approx(w["probs"][w["emotion"]], abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "sb").iterdir()) == ["custom_interface.py", "hyperparams.yaml"]


def test_fine_tuned_wavlm_export_follows_the_recipes_normalisation(adaltm_exp, tmp_path, offline):  # noqa: F811
    """An MTL experiment (fine-tuned WavLMEncoder; its CTC head left out), once with the recipe's per-utterance
    normalisation and once without: the feature extractor's do_normalize follows normalize_wav, and the pipeline
    matches the toolkit either way (exporting with the wrong setting would move probabilities by > 1e-3)."""
    from transformers import pipeline

    _, files, root = adaltm_exp
    work = tmp_path / "work"
    shutil.copytree(root / "base", work / "models" / "base")
    exp, _ = _mtl_experiment("models/base", work)
    outs = {}
    for normalize in (True, False):
        overrides = {"wavlm": {"normalize_wav": normalize}}
        out = export_hf(exp, tmp_path / f"export_{normalize}", overrides=overrides)
        assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is normalize
        want = load_model(exp, overrides=overrides).predict(files[:3], progress=False)
        got = _pipeline_probs(pipeline("audio-classification", model=str(out), trust_remote_code=True), files[:3])
        assert max(abs(g[c] - w["probs"][c]) for g, w in zip(got, want) for c in CLASSES) < 1e-5
        outs[normalize] = got
    assert max(abs(a[c] - b[c]) for a, b in zip(outs[True], outs[False]) for c in CLASSES) > 1e-3


def test_export_refuses_a_model_without_emotion_head_and_leaves_nothing(adaltm_exp, tmp_path, monkeypatch):  # noqa: F811
    """A model with no emotion head is a DataError naming it; a folder that would not reproduce the toolkit (here a
    feature extractor normalising differently from training) fails the self-check and no folder is left."""
    import tools.export_hf as export_mod
    from lobes.inference import Recognizer

    exp, _, _ = adaltm_exp
    folded = exp / "folded_wavlm"
    rec = load_model(folded)
    ctc_only = Recognizer(rec.modules["encoder"], ctc_head=torch.nn.Linear(32, 5))
    with pytest.raises(DataError, match=r"asr_model: has no emotion head"):
        export_mod.emotion_parts(ctc_only, "asr_model")

    real = export_mod.build_hf_model

    def wrong_head(*args):  # one weight off: what a key or layout mistake would do
        model = real(*args)
        with torch.no_grad():
            model.head.classifier[3].bias[0] += 1.0
        return model
    monkeypatch.setattr(export_mod, "build_hf_model", wrong_head)
    with pytest.raises(DataError, match=r"differs from the toolkit's by .* nothing written"):
        export_hf(folded, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_readme_share_a_model_snippets_run_against_an_export(adaltm_exp, hf_export, tmp_path, offline):  # noqa: F811
    """The README's "Share a model" code, run as written (paths swapped for the fixture's), gives tools.infer's
    probabilities through both libraries."""
    import re

    exp, files, _ = adaltm_exp
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Share a model\n", 1)[1].split("\n## ", 1)[0]
    assert len(section.splitlines()) <= 20
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1 and blocks[0].count('"hf_export"') == 2 and blocks[0].count('"speech.wav"') == 2
    code = blocks[0].replace('"hf_export"', repr(str(hf_export))).replace('"speech.wav"', repr(files[2]))
    printed = []
    namespace = {"print": printed.append}
    exec(compile(code, "README.md (Share a model)", "exec"), namespace)
    want = load_model(exp).predict([files[2]], progress=False)[0]
    pipe = {d["label"]: d["score"] for d in printed[0]}
    assert max(abs(pipe[c] - want["probs"][c]) for c in CLASSES) < 1e-5
    assert namespace["label"] == [want["emotion"]]
    assert torch.allclose(namespace["out_prob"][0], torch.tensor([want["probs"][c] for c in CLASSES]), atol=1e-5,
                          rtol=0)
