"""Shareable HarmoniFuse artefacts (lobes.harmonifuse.artefacts) and the export (tools/export_harmonifuse.py).

The recipe-trained experiment is conftest's ``harmonifuse_trained`` (one run per session, shared with
test_harmonifuse_recipe: the full row, LoRA LM, fine-tuned WavLM); the lm_mode full / frozen layouts are checked on
models built from the recipe YAML with the tiny fixtures, their trainable weights moved as training would.
"""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lobes.errors import DataError
from lobes.harmonifuse import artefacts as A
from lobes.harmonifuse.predict import predict
from lobes.hparams_io import load_hparams

try:
    from fake_hub import record_uploads
except ImportError:  # pytest --import-mode=importlib
    from tests.fake_hub import record_uploads

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "recipes/MSP-Podcast/harmonifuse/hparams/harmonifuse.yaml"
TINY_WAVLM = ROOT / "tools/fixtures/tiny_wavlm_pretrained"
TINY_LM = ROOT / "tools/fixtures/tiny_lm_pretrained"
DECODING = {"train_tasks": ["asr", "ser"], "asr_max_decode_len": 12, "ser_max_decode_len": 6, "num_beams": 1,
            "length_penalty": 1.0}



@pytest.fixture
def trained(harmonifuse_trained):
    return harmonifuse_trained


@pytest.fixture(scope="module")
def infer(load_recipe):
    return load_recipe("recipes/MSP-Podcast/harmonifuse/infer.py")


@pytest.fixture(scope="module")
def wavs(mini_corpora):
    files = sorted(Path(mini_corpora.libri).rglob("*.flac")) or sorted(Path(mini_corpora.libri).rglob("*.wav"))
    return [str(f) for f in files[:2]]


def _same_predictions(got, want, tol=1e-5):
    assert [r["transcript"] for r in got] == [r["transcript"] for r in want]
    assert [r["generated"] for r in got] == [r["generated"] for r in want]
    for g, w in zip(got, want):
        assert abs(sum(w["scores"].values()) - 1.0) < 1e-5
        assert max(abs(g["scores"][c] - w["scores"][c]) for c in w["scores"]) < tol, (g["scores"], w["scores"])


def test_lora_adapter_is_peft_native_and_gives_the_trained_lm_logits(trained, infer):
    """<exp>/lm_adapter/ is peft's own format: PeftModel.from_pretrained on the base LM gives the logits of the
    LM inside the trained SpeechLM (rebuilt from its SpeechBrain checkpoint) to 1e-6; the base alone does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in (trained / "lm_adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert not (trained / "lm").exists()
    slm, hp = infer.load_checkpoint(trained)
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hp["lm_source"]), trained / "lm_adapter")
    lm.eval()
    ids = torch.tensor([[1] + slm.tokenizer.encode("Transcribe the audio. HELLO")])
    with torch.no_grad():
        want = slm.lm(input_ids=ids).logits
        got = lm(input_ids=ids).logits
        with lm.disable_adapter():
            base = lm(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-6
    assert (base - want).abs().max() > 1e-3  # the adapters trained: saving the base weights would fail above
    # the speech side: no LM weight, the fine-tuned WavLM and every new module; the info names the base LM
    state = load_file(str(trained / A.SPEECH_FILE))
    assert not any(k.startswith("lm.") for k in state)
    assert torch.equal(state["encoder_fusion.layer_logits"], slm.encoder_fusion.layer_logits.detach())
    assert any(k.startswith("encoder.model.encoder.layers.") for k in state) and "adapter.proj.0.weight" in state
    assert torch.equal(state["adapter.proj.0.weight"], slm.adapter.proj[0].weight.detach())
    info = json.loads((trained / A.INFO_FILE).read_text())
    assert info["lm"] == {"trained_mode": "lora", "dtype": "float32", "attn_implementation": "sdpa",
                          "kind": "adapter", "dir": "lm_adapter", "base": os.path.abspath(hp["lm_source"])}
    assert info["encoder"]["included"] and info["decoding"]["train_tasks"] == ["asr", "ser"]


def test_artefacts_predict_as_the_checkpoint_with_the_base_lm_moved(trained, infer, wavs, tmp_path, capsys):
    """infer.py reads the shared artefacts; with the base LM moved (the recorded path gone), it fails naming the
    path, and --lm_source points at the new place: transcripts and SER scores equal the checkpoint's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in (A.SPEECH_FILE, A.INFO_FILE):
        shutil.copy(trained / name, shared / name)
    shutil.copytree(trained / "lm_adapter", shared / "lm_adapter")
    info = json.loads((shared / A.INFO_FILE).read_text())
    moved, gone = tmp_path / "models/moved_lm", tmp_path / "gone_lm"
    shutil.copytree(info["lm"]["base"], moved)
    (shared / A.INFO_FILE).write_text(json.dumps({**info, "lm": {**info["lm"], "base": str(gone)}}))
    assert infer.main(["--model", str(shared), wavs[0]]) == 2
    assert str(gone) in capsys.readouterr().err
    out = tmp_path / "out.json"
    assert infer.main(["--model", str(shared), "--lm_source", str(moved), *wavs, "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    slm, hp = infer.load_checkpoint(trained)
    want = predict(slm, A.decoding_settings(hp), wavs)
    _same_predictions(got, want)
    assert all(r["emotion"] in list(slm.emotions) + ["<invalid>"] for r in got)


def _card_snippet(card):
    section = card.split("## Load this export\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_export_card_snippet_runs_offline_and_predicts_as_the_experiment(trained, infer, wavs, tmp_path,
                                                                        monkeypatch, offline):
    """tools/export_harmonifuse.py: a merged LM (no adapter weights left) beside the speech modules, and a card
    whose hub metadata parses and whose loading snippet, run as written from the export's parent folder, gives
    the experiment's transcript and SER scores (1e-5)."""
    from huggingface_hub import ModelCard

    from tools.export_harmonifuse import main as export_main

    out = tmp_path / "hf_harmonifuse"
    assert export_main([str(trained), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "lm", A.SPEECH_FILE, A.INFO_FILE])
    lm_state = load_file(str(out / "lm/model.safetensors"))
    assert not any("lora_" in k for k in lm_state) and (out / "lm/char_tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    m = json.loads((trained / "metrics.json").read_text())
    data = ModelCard(card).data
    wer = [r for r in data.eval_results if r.metric_type == "wer"]
    assert len(wer) == 1 and wer[0].metric_value == float(f"{100 * m['wer']:.2f}") and \
        wer[0].dataset_name == "LibriSpeech"
    assert data.license == "apache-2.0" and data.datasets == ["LibriSpeech", "MSP-Podcast"]
    code = _card_snippet(card)
    assert '"hf_harmonifuse"' in code and '"speech.wav"' in code
    shutil.copy(wavs[0], tmp_path / "speech.wav")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md (Load this export)", "exec"), {"print": printed.append})
    slm, hp = infer.load_checkpoint(trained)
    want = predict(slm, A.decoding_settings(hp), [wavs[0]])
    assert want[0]["transcript"].strip()  # something decoded: an equal transcript says something
    _same_predictions(printed[0], want)
    # exporting again replaces the export; a folder the tool did not make is refused
    assert export_main([str(trained), str(out)]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep")
    assert export_main([str(trained), str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine/notes.txt").read_text() == "keep"


SELF_CHECK = re.compile(r"self-check: largest \|Δ log p\| (\S+) \((.+?)\) vs checkpoint CKPT\+\S+, tolerance 0.0001$", re.M)


def test_export_checks_itself_against_the_checkpoint_then_uploads_one_commit(trained, tmp_path, monkeypatch,
                                                                            capsys, offline):
    """The export is loaded back as the card's snippet does and compared with the experiment's best checkpoint
    (every trained task's log-probabilities on the fixed input: equal to float32 rounding, ≤ 1e-5 (3.8e-6 measured)
    against 1e-4 allowed); --push_to_hub then uploads exactly the export's files as one commit. One model in memory at a
    time: when a model's outputs are computed, every model loaded before it is freed (an LLM each at real scale;
    old code left the checkpoint's model, held by reference cycles, alive while the export was loaded: [0, 1])."""
    import gc
    import weakref

    from tools import export_harmonifuse as E
    from tools.export_harmonifuse import main as export_main
    from tools.export_harmonifuse import model_outputs

    calls = record_uploads(monkeypatch)
    loaded, alive = [], []

    def load_spy(*args, **kwargs):
        res = load(*args, **kwargs)
        loaded.append(weakref.ref(res[0]))
        return res

    def outputs_spy(model, tasks):
        alive.append(sum(r() is not None for r in loaded if r() is not model))
        loaded.append(weakref.ref(model))
        return outputs(model, tasks)

    load, outputs = A.load_artefacts, E.model_outputs
    monkeypatch.setattr(A, "load_artefacts", load_spy)
    monkeypatch.setattr(E, "model_outputs", outputs_spy)
    out = tmp_path / "hf_harmonifuse"
    gc.disable()  # cycles freed only where the export collects them
    try:
        assert export_main([str(trained), str(out), "--push_to_hub", "someone/harmonifuse"]) == 0
    finally:
        gc.enable()
    assert alive == [0, 0]  # at the checkpoint's outputs, then at the export's
    m = SELF_CHECK.search(capsys.readouterr().out)
    # float32 rounding: measured 3.8e-6 = 2^-18, one float32 ulp of a log-probability in [-64, -32) (ser class
    # scores, simplex LM fusion, the YAML default); residual LM fusion 4.8e-7 (asr token log-probabilities)
    assert m and float(m.group(1)) <= 1e-5, m
    outputs = model_outputs(A.load_artefacts(out)[0], ["asr", "ser"])
    assert {k: tuple(v.shape) for k, v in outputs.items() if "class" in k} == {"ser class scores": (2, 8)}
    assert sorted(outputs) == ["asr token log-probabilities", "ser class scores", "ser token log-probabilities"]
    assert calls[0] == ("create_repo", "someone/harmonifuse", {"repo_type": "model", "exist_ok": True})
    _, repo, files, message = calls[1]
    assert len(calls) == 2 and repo == "someone/harmonifuse" and message == f"HarmoniFuse export of {trained.name}"
    on_disk = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == on_disk and {"README.md", "lm/model.safetensors", "lm/config.json", A.SPEECH_FILE,
                                 A.INFO_FILE} <= set(files)


def test_a_corrupted_weight_is_refused_nothing_replaced_nothing_uploaded(trained, tmp_path, monkeypatch, capsys,
                                                                          offline):
    """One adapter weight moved by 1.0 in the written speech modules (log p moves by ~3e-2 on the tiny model):
    exit 2 naming the difference, the earlier export left as it was, no staging folder left, nothing uploaded."""
    from tools.export_harmonifuse import main as export_main

    write = A.write_speech_modules

    def write_corrupted(model, folder, *args, **kwargs):
        path = write(model, folder, *args, **kwargs)
        state = load_file(str(Path(folder) / A.SPEECH_FILE))
        state["adapter.proj.0.weight"][0, 0] += 1.0
        save_file(state, str(Path(folder) / A.SPEECH_FILE))
        return path

    monkeypatch.setattr(A, "write_speech_modules", write_corrupted)
    calls = record_uploads(monkeypatch)
    out = tmp_path / "hf_harmonifuse"
    out.mkdir()
    (out / A.INFO_FILE).write_text("an earlier export")
    assert export_main([str(trained), str(out), "--push_to_hub", "someone/harmonifuse"]) == 2
    err = capsys.readouterr().err
    m = re.search(r"the export differs from the trained model \(checkpoint CKPT\+\S+\) by (\S+) in (ser|asr) "
                  r"(token log-probabilities|class scores) \(> 0.0001 for a float32 LM\); nothing was written", err)
    assert m and float(m.group(1)) > 1e-2, err
    assert calls == [] and [p.name for p in tmp_path.iterdir()] == ["hf_harmonifuse"]
    assert [p.name for p in out.iterdir()] == [A.INFO_FILE] and (out / A.INFO_FILE).read_text() == "an earlier export"


def test_without_a_checkpoint_the_export_is_checked_against_the_shared_artefacts(trained, tmp_path, caplog):
    """An experiment whose save/ is gone (kept its shared artefacts only) is checked against those, said so."""
    from tools.export_harmonifuse import export_harmonifuse

    (trained / "save").rename(trained / "save.away")
    try:
        out, check = export_harmonifuse(trained, tmp_path / "export")
    finally:
        (trained / "save.away").rename(trained / "save")
    # ≤ one float32 ulp of a log p in [-64, -32) (2^-18 = 3.8e-6 measured), see the test above
    assert check["reference"] == A.INFO_FILE and check["difference"] <= 1e-5 and check["tolerance"] == 1e-4
    assert f"{trained}: no checkpoint" in caplog.text and (out / A.INFO_FILE).is_file()


def _perturbed_model(tmp_path, **overrides):
    """The recipe YAML's SpeechLM on the tiny fixtures, every trainable weight moved (as training would)."""
    h, _, _ = load_hparams(str(YAML), {"msp_folder": "unused", "libri_folder": "unused",
                                       "output_folder": str(tmp_path / "exp"), "wavlm_source": str(TINY_WAVLM),
                                       "lm_source": str(TINY_LM), **overrides})
    model = h["speech_lm"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _outputs(model, wavs, lens):
    with torch.no_grad():
        return [model(wavs, lens, "asr", ["HELLO", "OK"]).logits, model(wavs, lens, "ser", ["Anger", "Fear"]).logits]


@pytest.mark.parametrize("lm_mode", ["full", "frozen"])
def test_full_and_frozen_lm_layouts_rebuild_the_model(lm_mode, tmp_path):
    """full: the LM in <exp>/lm/ (save_pretrained + tokenizer); frozen: no LM files, the base referenced, and a
    frozen WavLM referenced too (not in speech_modules). Soft prompts and the classify head (full) / the channel
    gate (frozen) are speech modules. The rebuilt model's logits equal the trained model's to 1e-6."""
    extra = ({"lm_mode": "full", "prompt_mode": "soft", "ser_mode": "classify"} if lm_mode == "full" else
             {"lm_mode": "frozen", "freeze_wavlm": True, "encoder_gate": "channel"})
    model = _perturbed_model(tmp_path, **extra)
    folder = tmp_path / "exp"
    A.write_artefacts(model, folder, DECODING)
    assert (folder / "lm").is_dir() == (lm_mode == "full") and not (folder / "lm_adapter").exists()
    state = load_file(str(folder / A.SPEECH_FILE))
    assert any(k.startswith("encoder.") for k in state) == (lm_mode == "full")
    assert ("prompts" in state and "classifier.weight" in state) == (lm_mode == "full")
    assert ("encoder_fusion.gate_logits" in state) == (lm_mode == "frozen")
    loaded, info = A.load_artefacts(folder)
    assert info["decoding"] == DECODING and info["lm"]["kind"] == {"full": "model", "frozen": "base"}[lm_mode]
    wavs, lens = torch.randn(2, 3200, generator=torch.Generator().manual_seed(1)), torch.tensor([1.0, 0.6])
    for got, want in zip(_outputs(loaded, wavs, lens), _outputs(model, wavs, lens)):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-6
    if lm_mode == "frozen":  # a referenced WavLM that moved: wavlm_source names where it is now
        with pytest.raises(DataError, match="nowhere"):
            A.load_artefacts(folder, wavlm_source=str(tmp_path / "nowhere"))
    if lm_mode == "full":  # the LM's own weights trained: the base LM would give other logits
        base = A.load_artefacts(folder, lm_source=str(TINY_LM))[0]
        assert (_outputs(base, wavs, lens)[0] - _outputs(model, wavs, lens)[0]).abs().max() > 1e-3


def test_speech_modules_of_another_model_are_refused_naming_the_file(tmp_path):
    model = _perturbed_model(tmp_path, lm_mode="frozen", freeze_wavlm=True)
    folder = tmp_path / "exp"
    A.write_artefacts(model, folder, DECODING)
    state = load_file(str(folder / A.SPEECH_FILE))
    del state["adapter.proj.0.weight"]
    save_file(state, str(folder / A.SPEECH_FILE))
    with pytest.raises(DataError, match=re.escape(str(folder / A.SPEECH_FILE)) +
                       r".*missing \['adapter.proj.0.weight'\]"):
        A.load_artefacts(folder)
    (folder / A.INFO_FILE).unlink()
    with pytest.raises(DataError, match=re.escape(str(folder / A.INFO_FILE)) + ": missing"):
        A.load_artefacts(folder)
