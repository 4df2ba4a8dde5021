"""tools.eval_asr: the ASR source models' WER on a manifest (our recipe's exp folder, or an HF WavLMForCTC)."""
import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import Wav2Vec2CTCTokenizer, WavLMConfig, WavLMForCTC

from lobes import ctc_text
from lobes.errors import DataError
from tools import eval_asr as E
from tools.make_tiny_wavlm import CONFIG, make_tiny_wavlm

REFS = {"u1": "A", "u2": "B C", "u3": "a", "u4": "D'S E F", "u5": "A B"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_asr")
    rng = np.random.default_rng(0)
    data = {}
    for i, (k, wrd) in enumerate(REFS.items()):
        n = 4000 + 1700 * i  # different lengths: batches are padded
        wav = root / f"{k}.wav"
        sf.write(wav, (0.1 * rng.standard_normal(n)).astype("float32"), 16000)
        data[k] = {"wav": str(wav), "duration": n / 16000, "wrd": wrd}
    path = root / "test.json"
    path.write_text(json.dumps(data))
    return path, data


def _ckpt(save, stamp, loss, head):
    d = save / f"CKPT+{stamp}"
    d.mkdir(parents=True)
    (d / "CKPT.yaml").write_text(f"end-of-epoch: true\nloss: {loss}\nunixtime: 1.0\n")
    torch.save(head.state_dict(), d / "ctc_head.ckpt")


def _biased_head(hidden, token_index):
    head = torch.nn.Linear(hidden, len(ctc_text.VOCAB))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_index] = 5.0  # every frame: this token
    return head


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory):
    exp = tmp_path_factory.mktemp("asr_exp")
    wavlm = make_tiny_wavlm(exp / "finetuned_wavlm", seed=3)
    hidden = json.loads((wavlm / "config.json").read_text())["hidden_size"]
    _ckpt(exp / "save", "2026-01-01+00-00-00+00", 2.5, _biased_head(hidden, ctc_text.CHAR_TO_INDEX["B"]))
    _ckpt(exp / "save", "2026-01-02+00-00-00+00", 1.5, _biased_head(hidden, ctc_text.CHAR_TO_INDEX["A"]))
    return exp


def test_exp_uses_the_lowest_loss_checkpoint_and_pools_the_wer(manifest, exp_dir, tmp_path):
    path, _ = manifest
    out = tmp_path / "asr_in" / "metrics.json"
    assert E.main(["--exp", str(exp_dir), "--manifest", str(path), "--out", str(out), "--batch_size", "2",
                   "--experiment", "asr_in"]) == 0
    m = json.loads(out.read_text())
    # best checkpoint (loss 1.5) says "A" for every utterance; refs A | B C | A | D'S E F | A B (9 words):
    # u1 0, u2 1S+1D, u3 0, u4 1S+2D, u5 1D -> 6 / 9
    assert m["wer"] == pytest.approx(6 / 9, abs=1e-12)
    assert (m["n"], m["experiment"], m["kind"]) == (5, "asr_in", "exp")
    assert m["wer_details"]["n_ref_words"] == 9
    # Whisper's normaliser expands "D'S" to "d is" and lower-cases: 10 reference words, u4 now 1S + 3D -> 7 / 10
    assert m["wer_whisper_norm"] == pytest.approx(7 / 10, abs=1e-12)
    assert [e["hyp"] for e in m["asr_examples"]] == ["A"] * 5
    assert [e["ref"] for e in m["asr_examples"]][2] == "A"  # references are normalised as for training
    # every transcript beside it, for the paired WER test of tools.compare_rows
    rows = list(csv.DictReader(open(out.parent / "asr_predictions.csv", encoding="utf-8")))
    assert [(r["id"], r["ref"], r["hyp"]) for r in rows] == [("u1", "A", "A"), ("u2", "B C", "A"), ("u3", "A", "A"),
                                                             ("u4", "D'S E F", "A"), ("u5", "A B", "A")]


def test_padding_does_not_change_hypotheses(manifest, exp_dir):
    path, data = manifest
    model = E.RecipeCTC(exp_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        model.head.weight.normal_(0, 3.0)  # a head that reads the features: varied hypotheses
        model.head.bias.zero_()
    batched = E.transcribe(model, data, batch_size=5)
    alone = E.transcribe(model, data, batch_size=1)
    assert batched == alone
    assert len(set(batched.values())) > 1  # not a constant output


def test_hf_ctc_decodes_with_its_own_vocabulary(manifest, tmp_path):
    path, _ = manifest
    # an HF-script vocabulary: sorted characters, [UNK] and [PAD] (the blank) last - unlike lobes.ctc_text.VOCAB
    vocab = {c: i for i, c in enumerate(["'"] + [chr(c) for c in range(65, 91)] + ["|", "[UNK]", "[PAD]"])}
    src = tmp_path / "hf_ctc"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps(vocab))
    tok = Wav2Vec2CTCTokenizer(str(src / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                               word_delimiter_token="|")
    tok.save_pretrained(src)
    cfg = json.loads(CONFIG.read_text())
    cfg.pop("model_type", None)
    cfg.update(vocab_size=len(vocab), pad_token_id=vocab["[PAD]"])
    model = WavLMForCTC(WavLMConfig(**cfg))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[vocab["B"]] = 5.0  # index 2: "'" in ours, "B" in this vocabulary
    model.save_pretrained(src)
    m = E.evaluate(path, tmp_path / "out.json", hf_ctc=str(src), batch_size=3)
    assert [e["hyp"] for e in m["asr_examples"]] == ["B"] * 5
    # hyp "B": u1 1S, u2 1D (B hit), u3 1S, u4 1S+2D, u5 1D (B hit) -> 7 / 9
    assert m["wer"] == pytest.approx(7 / 9, abs=1e-12)
    assert m["kind"] == "hf_ctc" and m["experiment"] == "hf_ctc"


def test_bad_inputs(manifest, exp_dir, tmp_path):
    path, _ = manifest
    with pytest.raises(DataError, match="no CKPT"):
        E.best_checkpoint(tmp_path)
    with pytest.raises(DataError, match="no exported fine-tuned WavLM"):
        E.RecipeCTC(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"wav": "a.wav"}}))
    with pytest.raises(DataError, match="without 'wav' and 'wrd'"):
        E.evaluate(bad, tmp_path / "o.json", exp=exp_dir)
    backbone_only = tmp_path / "backbone_only"
    shutil.copytree(exp_dir / "finetuned_wavlm", backbone_only)
    (backbone_only / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(ctc_text.VOCAB)}))
    with pytest.raises(DataError, match=r"holds no CTC head \(\['lm_head"):
        E.HFCTC(str(backbone_only))
    with pytest.raises(DataError, match="exactly one"):
        E.load_model()
    assert not (tmp_path / "o.json").exists()


def test_run_sh_stage4_source_rows_and_figures(manifest, exp_dir, tmp_path):
    """Stage 4 alone on a finished experiment: reference rows evaluated and placed, Figures 2 and 3 drawn."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from matplotlib.image import imread

    root = Path(__file__).resolve().parents[1]
    path, _ = manifest
    exp = tmp_path / "exp"
    (exp / "prep" / "msp").mkdir(parents=True)
    shutil.copy(path, exp / "prep" / "msp" / "test.json")
    shutil.copytree(exp_dir, exp / "asr_ctc_msp")                  # in-domain: our recipe's folder (hyp "A")
    shutil.copytree(exp_dir, exp / "asr_ctc_libri" / "finetuned_wavlm_parent")
    (exp / "ser").mkdir()
    (exp / "ser" / "metrics.json").write_text(json.dumps({"test": {"uar": 0.39, "precision": 0.35,
                                                                   "macro_f1": 0.3556}}))
    lam = [0.5, 0.6, 0.4, 0.7, 0.3]
    for row, vecs in {"setup4_dual": ("ASR", "SER"), "setup2_asr_only": ("ASR",), "setup3_ser_only": ("SER",),
                      "out_of_domain_dual": ("ASR", "SER")}.items():
        d = exp / "rows" / row / "1986"
        d.mkdir(parents=True)
        (d / "coefficients.json").write_text(json.dumps({"lambda": {v: lam for v in vecs}, "alpha": [0.25] * 4}))
        (d / "metrics.json").write_text(json.dumps({"part": "Part 2: x", "row": row, "test": {"uar": 0.4}}))
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "recipes/MSP-Podcast/adaltm/run.sh"), "--stage", "4", "--data_folder",
                           str(tmp_path), "--exp", str(exp), "--asr_out_source",
                           str(exp / "asr_ctc_libri" / "finetuned_wavlm_parent" / "finetuned_wavlm")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (exp / "results" / "table.md").read_text()
    assert "| SER source (W_SER) | 39.00 | 35.00 | 35.56 | - |" in table
    sources = exp / "results" / "sources"
    for label, src in (("In-domain ASR source (W_ASR_in)", "asr_in"), ("Out-of-domain ASR source (W_ASR_out)",
                                                                        "asr_out")):  # the second via its parent
        lo, hi = json.loads((sources / src / "metrics.json").read_text())["wer_ci"]
        assert lo <= 6 / 9 <= hi
        assert f"| {label} | - | - | - | {100 * 6 / 9:.2f} ± {100 * (hi - lo) / 2:.2f} |" in table
    assert table.index("SER source") < table.index("setup4_dual")  # the reference part comes first
    for name in ("figure2_lambda_dual_vs_single.png", "figure3_lambda_domain.png"):
        assert imread(exp / "results" / "plots" / name).shape == (450, 800, 4)
