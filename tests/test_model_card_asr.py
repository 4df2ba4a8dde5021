"""tools.model_card on an ASR-CTC experiment: its finetuned_wavlm/ is a WavLMForCTC with its processor
(lobes.ctc_export), and the card's ``pipeline("automatic-speech-recognition", ...)`` snippet, run as written
offline, transcribes as the recipe's own greedy decoding does."""
import json
import re
from pathlib import Path

import pytest

try:  # the IEMOCAP ASR recipe's Brain, test hypotheses and export (tiny pretrained WavLM, untrained head)
    from test_asr_pipeline import ASR_DIR, recipe_asr  # noqa: F401
except ImportError:  # pytest --import-mode=importlib
    from tests.test_asr_pipeline import ASR_DIR, recipe_asr  # noqa: F401
try:
    from fake_hub import record_uploads
except ImportError:  # pytest --import-mode=importlib
    from tests.fake_hub import record_uploads
from tools.model_card import model_card

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def asr_exp(recipe_asr):  # noqa: F811
    """The experiment folder around the export: hyperparams.yaml as create_experiment_directory saves it, and a
    metrics.json with a WER."""
    from hyperpyyaml import resolve_references

    exp = Path(recipe_asr["export"]).parent
    text = (ROOT / ASR_DIR / "hparams" / "train_asr_ctc.yaml").read_text(encoding="utf-8")
    (exp / "hyperparams.yaml").write_text(resolve_references(text, {"data_folder": "d", "fold": 1}).getvalue())
    (exp / "metrics.json").write_text(json.dumps({"experiment": "asr_ctc", "fold": 1, "test_loss": 1.0, "wer": 0.25}))
    return exp


def test_card_of_an_asr_experiment_runs_its_pipeline_snippet_as_the_recipe_decodes(recipe_asr, asr_exp,  # noqa: F811
                                                                                  offline):
    text = model_card(asr_exp)
    assert "pipeline_tag: automatic-speech-recognition" in text and "| WER | 25.00 | – |" in text
    assert "holds the fine-tuned backbone alone" not in text and "predicted emotion" not in text
    assert '    print(r["file"], r["transcript"], r["error"])' in text
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "automatic-speech-recognition" in c]
    assert 'pipeline("automatic-speech-recognition", model="finetuned_wavlm")' in code
    assert "lobes" not in code and "tools" not in code  # transformers + soundfile only
    got = {}
    for utt, wav in sorted(recipe_asr["wavs"].items())[:4]:
        run = code.replace('model="finetuned_wavlm"', f'model="{recipe_asr["export"]}"')
        run = run.replace('sf.read("speech.wav"', f'sf.read("{wav}"')
        printed = []
        exec(compile(run, "model_card_asr_snippet", "exec"), {"print": printed.append})
        (got[utt],) = printed
    want = {u: recipe_asr["hyps"][u] for u in got}
    assert got == want and len(set(want.values())) == 4  # four different transcripts, as the recipe decoded them


def test_push_to_hub_uploads_the_card_and_the_ctc_export_as_one_commit(recipe_asr, asr_exp, monkeypatch,  # noqa: F811
                                                                       offline):
    """--push_to_hub on an ASR-CTC experiment: one commit of the card (its pipeline snippet naming the repo) and
    the files of finetuned_wavlm/ at the repo's root, so pipeline(model=REPO) reads them; nothing without it."""
    from tools.model_card import main

    calls = record_uploads(monkeypatch)
    assert main([str(asr_exp)]) == 0 and calls == []
    assert main([str(asr_exp), "--push_to_hub", "someone/asr-ctc"]) == 0
    assert calls[0] == ("create_repo", "someone/asr-ctc", {"repo_type": "model", "exist_ok": True})
    _, repo, files, message = calls[1]
    assert len(calls) == 2 and repo == "someone/asr-ctc" and message == f"Model card and export of {asr_exp.name}"
    export = Path(recipe_asr["export"])
    assert sorted(files) == ["README.md", "added_tokens.json", "config.json", "model.safetensors",
                             "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json",
                             "vocab.json"]
    assert all(files[f] == (export / f).read_bytes() for f in files if f != "README.md")
    card = files["README.md"].decode()
    assert card == (asr_exp / "README.md").read_text() and "library_name: transformers" in card
    assert 'pipeline("automatic-speech-recognition", model="someone/asr-ctc")' in card
