"""Inference (lobes.inference, lobes.adaltm.fold_export, tools.infer) on a real AdaLTM experiment trained by the
recipe on the mini corpus.

The module fixture trains one AdaLTM Setup-4 run (two task vectors from two tiny "fine-tuned" WavLMs, 1 epoch, a
balanced 16/8/8 subset of the mini corpus) with the recipe's own train.py, as a user would, then every test
loads that experiment directory and/or its folded export.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lobes.audio import audio_info, read_audio
from lobes.errors import DataError
from lobes.inference import best_checkpoint, duration_batches, find_audio_files, training_root
from tools.infer import load_model

ROOT = Path(__file__).resolve().parents[1]
ADALTM = ROOT / "recipes/MSP-Podcast/adaltm"


def _subset(manifest, per_class, out):
    """The first ``per_class`` utterances of every class: a balanced, tiny split."""
    data = json.loads(Path(manifest).read_text())
    seen, keep = {}, {}
    for utt, entry in data.items():
        if seen.get(entry["emo"], 0) < per_class:
            seen[entry["emo"]] = seen.get(entry["emo"], 0) + 1
            keep[utt] = entry
    out.write_text(json.dumps(keep))
    return keep


_BUILT = {}  # one recipe run per test session, also when test_model_card imports this fixture


@pytest.fixture(scope="session")
def adaltm_exp(msp_manifests, tmp_path_factory):
    if "exp" not in _BUILT:
        _BUILT["exp"] = _train_adaltm(msp_manifests, tmp_path_factory)
    return _BUILT["exp"]


def _train_adaltm(msp_manifests, tmp_path_factory):
    from tools.extract_task_vector import extract_task_vector
    from tools.make_tiny_wavlm import make_tiny_wavlm

    root = tmp_path_factory.mktemp("infer")
    base = make_tiny_wavlm(root / "base", seed=0)
    vectors = root / "vectors"
    for name, out, seed in (("ASR", "asr_in", 1), ("SER", "ser", 2)):
        ft = make_tiny_wavlm(root / f"ft_{out}", seed=seed)
        extract_task_vector(base, ft, name, vectors / f"{out}.safetensors", verbose=False)
    prep = root / "prep"
    prep.mkdir()
    test = {}
    for split, n in (("train", 2), ("valid", 1), ("test", 1)):
        kept = _subset(msp_manifests / f"{split}.json", n, prep / f"{split}.json")
        if split == "test":
            test = kept
    cmd = [sys.executable, str(ADALTM / "train.py"), str(ADALTM / "hparams/rows/setup4_dual.yaml"),
           f"--data_folder={root}/unused", f"--prep_folder={prep}", "--skip_prep=True", f"--wavlm_source={base}",
           f"--vectors_folder={vectors}", f"--exp_folder={root}/exp", "--number_of_epochs=1", "--lr=0.01",
           "--head_hidden=16", "--num_bootstraps=20", "--device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    exp = root / "exp" / "setup4_dual" / "1986"
    files = [entry["wav"] for entry in test.values()]
    return exp, files, root


@pytest.fixture(scope="module")
def exp_model(adaltm_exp):
    return load_model(adaltm_exp[0])


def _max_diff(a, b):
    return max(abs(x["probs"][c] - y["probs"][c]) for x, y in zip(a, b) for c in x["probs"])


# ----------------------------------------------------------------------------------------------------------------
def test_duration_batches_hand_computed():
    # ascending: idx1 (1 s), idx3 (2 s), idx2 (3 s), idx0 (5 s), idx4 (10 s); padded size = n x longest <= 6 s
    assert duration_batches([5, 1, 3, 2, 10], 6) == [[1, 3], [2], [0], [4]]
    assert duration_batches([1, 1, 1], 3) == [[0, 1, 2]]
    assert duration_batches([], 3) == []


def test_best_checkpoint_is_speechbrains_lowest_loss_then_most_recent(tmp_path):
    """SpeechBrain's find_checkpoint(min_key="loss"): lowest loss; of equal losses the most recent; a checkpoint
    without a loss (intra-epoch) is never picked."""
    for name, meta in (("CKPT+a", "loss: 2.5\nunixtime: 3\n"), ("CKPT+b", "loss: 2.1\nunixtime: 1\n"),
                       ("CKPT+c", "loss: 2.3\nunixtime: 2\n"), ("CKPT+d", "unixtime: 4\n"),
                       ("CKPT+e", "loss: 2.1\nunixtime: 0.5\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "CKPT.yaml").write_text("end-of-epoch: true\n" + meta)
    ckpt = best_checkpoint(tmp_path)
    assert ckpt.path.name == "CKPT+b" and ckpt.meta["loss"] == 2.1
    assert best_checkpoint(tmp_path, min_key="unixtime").path.name == "CKPT+e"
    with pytest.raises(DataError, match="no CKPT.*'loss'"):
        best_checkpoint(tmp_path / "CKPT+d")
    assert not (tmp_path / "nothing_here").exists()
    with pytest.raises(DataError, match="no CKPT"):
        best_checkpoint(tmp_path / "nothing_here")
    assert not (tmp_path / "nothing_here").exists()  # no folder left behind a wrong path


def test_training_root_strips_relative_output_folder(tmp_path):
    exp = tmp_path / "work" / "exp" / "row" / "1986"
    exp.mkdir(parents=True)
    assert training_root(exp, "exp/row/1986") == (tmp_path / "work").resolve()
    assert training_root(exp, "./exp/row/1986") == (tmp_path / "work").resolve()
    assert training_root(exp, "other/row/1986") == Path.cwd()  # moved: fall back to the current folder


def test_find_audio_files_recurses_and_keeps_named_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for f in ("d/b.wav", "d/sub/a.FLAC", "d/sub/c.mp3", "d/notes.txt", "d/x.ogg"):
        (tmp_path / f).write_bytes(b"")
    found = find_audio_files([tmp_path / "d", tmp_path / "missing.wav", tmp_path / "d" / "b.wav"])
    rel = [os.path.relpath(f, tmp_path) for f in found]
    assert rel == ["d/b.wav", "d/sub/a.FLAC", "d/sub/c.mp3", "d/x.ogg", "missing.wav"]


# ----------------------------------------------------------------------------------------------------------------
def test_experiment_reproduces_recipe_test_predictions(adaltm_exp, exp_model):
    """The test stage wrote predictions.csv with the best checkpoint: loading the folder must reproduce it."""
    exp, files, _ = adaltm_exp
    ref = {r["id"]: r for r in csv.DictReader(open(exp / "predictions.csv"))}
    got = exp_model.predict(files, progress=False)
    assert len(ref) == len(files) == 8
    for f, r in zip(files, got):
        row = ref[Path(f).stem]
        assert r["error"] is None and r["emotion"] == row["pred"]
        for c, p in r["probs"].items():
            assert p == pytest.approx(float(row[c]), abs=2e-6)  # the CSV keeps 6 decimals
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-6)


def test_experiment_and_folded_export_agree(adaltm_exp, exp_model):
    exp, files, _ = adaltm_exp
    folded = load_model(exp / "folded_wavlm")
    a = exp_model.predict(files, progress=False)
    b = folded.predict(files, progress=False)
    assert [r["emotion"] for r in a] == [r["emotion"] for r in b]
    assert _max_diff(a, b) < 1e-4
    # the λ of the export are the checkpoint's, and they moved from their init in training
    lam = json.loads((exp / "folded_wavlm" / "merge_info.json").read_text())["lambda"]
    assert torch.allclose(exp_model.modules["encoder"].lambdas().detach(),
                          torch.tensor([lam["ASR"], lam["SER"]]), atol=1e-7)
    assert any(abs(v - 0.5) > 1e-4 for v in lam["SER"])
    # the export records every downstream setting the loader needs (none left to its defaults)
    cfg = json.loads((exp / "folded_wavlm" / "downstream.json").read_text())
    assert {"include_cnn", "layer_norm", "normalize_wav", "pooling", "head_hidden", "classes"} <= set(cfg)
    assert cfg["normalize_wav"] is True and cfg["layer_norm"] is False
    # ... and states each module's configuration, which the loader builds them from (not from parameter names)
    assert cfg["format_version"] == 2
    assert cfg["weighted_sum"] == {"num_layers": 4, "include_cnn": False, "layer_norm": False}
    assert cfg["ser_head"] == {"input_size": 32, "hidden_size": 16, "num_classes": 8, "pooling": "mean",
                               "dropout": 0.1, "num_proj_layers": 1, "head_type": "frame_mlp"}
    # folding at load time gives the same model as the export
    c = load_model(exp, fold=True).predict(files[:3], progress=False)
    assert _max_diff(c, b[:3]) < 1e-4


def test_folded_export_of_the_flat_format_still_loads_and_an_undescribed_one_is_refused(adaltm_exp, tmp_path):
    """Exports written before downstream.json stated its modules (flat keys only) load to the same model; one
    that cannot describe them is a DataError naming the file and the missing key."""
    exp, files, _ = adaltm_exp
    old = tmp_path / "old_export"
    shutil.copytree(exp / "folded_wavlm", old)
    cfg = json.loads((old / "downstream.json").read_text())
    for key in ("format_version", "weighted_sum", "ser_head"):
        del cfg[key]
    (old / "downstream.json").write_text(json.dumps(cfg))
    want = load_model(exp / "folded_wavlm").predict(files[:2], progress=False)
    got = load_model(old).predict(files[:2], progress=False)
    assert _max_diff(got, want) == 0.0
    del cfg["head_hidden"]
    (old / "downstream.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"downstream.json: states no 'ser_head'.*lacks 'head_hidden'"):
        load_model(old)


def test_stereo_44k_file_matches_its_16k_mono_copy(adaltm_exp, exp_model, tmp_path):
    """Stereo 44.1 kHz (left = utterance A, right = utterance B) vs sox's own 16 kHz mono mix of it.

    Tolerance: the two paths use different resamplers (sox's vs torchaudio's windowed sinc), which differ near
    8 kHz: the waveforms agree to ~39 dB SNR (checked below, > 30 dB required). On this model that moves class
    probabilities by ~5e-5; 1e-3 leaves a 20x margin while taking one channel only would give another signal
    entirely (SNR ~0 dB against the mix, checked too).
    """
    _, files, _ = adaltm_exp
    stereo, mono = tmp_path / "stereo44k.wav", tmp_path / "mono16k.wav"
    subprocess.run(["sox", "-M", files[0], files[1], "-r", "44100", str(stereo)], check=True)
    subprocess.run(["sox", str(stereo), "-r", "16000", "-c", "1", "-e", "floating-point", "-b", "32", str(mono)],
                   check=True)
    ours, ref = read_audio(stereo, convert=True), read_audio(mono, convert=True)
    assert audio_info(stereo)[::2] == (44100, 2)
    n = min(len(ours), len(ref))
    assert abs(len(ours) - len(ref)) <= 1
    snr = 20 * torch.log10(ref[:n].norm() / (ours[:n] - ref[:n]).norm())
    assert snr > 30
    left = read_audio(files[0])
    m = min(n, len(left))
    assert 20 * torch.log10(ref[:m].norm() / (left[:m] - ref[:m]).norm()) < 10  # one channel is not the mix

    a, b = exp_model.predict([stereo, mono], progress=False)
    assert (a["sample_rate"], a["channels"], b["sample_rate"], b["channels"]) == (44100, 2, 16000, 1)
    assert a["emotion"] == b["emotion"]
    assert _max_diff([a], [b]) < 1e-3


def test_cli_reports_corrupt_files_and_predicts_the_rest(adaltm_exp, exp_model, tmp_path, capsys):
    from tools.infer import main

    exp, files, _ = adaltm_exp
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(files[0], folder / "good1.wav")
    shutil.copy(files[1], folder / "sub" / "good2.wav")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00not really a wave file" * 20)
    (folder / "sub" / "empty.flac").write_bytes(b"")
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    code = main(["--model", str(exp), "--json", str(out_json), "--csv", str(out_csv), "--no-progress",
                 str(folder), str(tmp_path / "missing.wav")])
    assert code == 1
    err = capsys.readouterr().err
    for path in (folder / "broken.wav", folder / "sub" / "empty.flac", tmp_path / "missing.wav"):
        assert f"FAILED {path}: " in err  # each failure named, with its reason
    assert "2 of 5 files predicted" in err

    results = {Path(r["file"]).name: r for r in json.loads(out_json.read_text())}
    assert set(results) == {"broken.wav", "good1.wav", "empty.flac", "good2.wav", "missing.wav"}
    bad = {n for n, r in results.items() if r["error"]}
    assert bad == {"broken.wav", "empty.flac", "missing.wav"}
    assert all(n in results[n]["error"] and results[n]["probs"] is None for n in bad)
    direct = exp_model.predict([files[0], files[1]], progress=False)
    assert _max_diff([results["good1.wav"], results["good2.wav"]], direct) < 1e-6
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 5 and sorted(r["status"] for r in rows) == ["failed"] * 3 + ["ok"] * 2
    good = next(r for r in rows if r["file"].endswith("good1.wav"))
    assert float(good[direct[0]["emotion"]]) == pytest.approx(direct[0]["probs"][direct[0]["emotion"]], abs=1e-6)


def test_cli_exit_code_2_for_bad_model_or_no_inputs(adaltm_exp, tmp_path, capsys):
    from tools.infer import main

    _, files, _ = adaltm_exp
    assert main(["--model", str(tmp_path), files[0]]) == 2
    assert "neither an experiment directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path), str(tmp_path / "empty")]) == 2
    assert "no audio files" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
def _mtl_experiment(base_rel, root):
    """A hand-made MTL experiment under ``root`` (as train.py would leave it) with two checkpoints.

    Paths in its hyperparams.yaml are relative to ``root`` (the folder "training ran from"); data_folder is left a
    !PLACEHOLDER. Returns (exp dir, {name: module} of the best checkpoint's weights).
    """
    from hyperpyyaml import load_hyperpyyaml, resolve_references

    overrides = {"wavlm_source": base_rel, "exp_folder": "exp_rel", "head_hidden": 8, "data_folder": "@DATA@"}
    with open(ROOT / "recipes/MSP-Podcast/mtl/hparams/mtl.yaml") as f:
        text = resolve_references(f, overrides).getvalue().replace("@DATA@", "!PLACEHOLDER")
    exp = root / "exp_rel" / "mtl_fully_trainable" / "1986"
    exp.mkdir(parents=True)
    (exp / "hyperparams.yaml").write_text(text)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        hp = load_hyperpyyaml(text, {"data_folder": "x"})
    finally:
        os.chdir(cwd)
    states = {}
    for tag, loss, seed, when in (("worse", 3.0, 1, 2.0), ("best", 2.0, 2, 1.0)):
        torch.manual_seed(seed)
        for name in ("wavlm", "weighted_sum", "ser_head", "ctc_head"):
            for p in hp["modules"][name].parameters():
                p.data.add_(0.05 * torch.randn_like(p))
        ckpt = exp / "save" / f"CKPT+{tag}"
        ckpt.mkdir(parents=True)
        (ckpt / "CKPT.yaml").write_text(f"end-of-epoch: true\nloss: {loss}\nunixtime: {when}\n")
        for name in ("wavlm", "weighted_sum", "ser_head", "ctc_head"):
            torch.save(hp["modules"][name].state_dict(), ckpt / f"{name}.ckpt")
        states[tag] = {n: {k: v.clone() for k, v in hp["modules"][n].state_dict().items()}
                       for n in ("wavlm", "weighted_sum", "ser_head", "ctc_head")}
    for name, state in states["best"].items():
        hp["modules"][name].load_state_dict(state)
    return exp, hp["modules"]


def test_mtl_experiment_loads_best_checkpoint_with_transcripts(adaltm_exp, tmp_path):
    from lobes.inference import Recognizer

    _, files, root = adaltm_exp
    work = tmp_path / "work"
    shutil.copytree(root / "base", work / "models" / "base")
    exp, modules = _mtl_experiment("models/base", work)
    model = load_model(exp)  # cwd is not `work`: the relative wavlm_source must still resolve
    assert model.has_ctc and model.has_ser
    assert not (Path.cwd() / "exp_rel").exists()  # nothing was created relative to the current folder
    expected = Recognizer(modules["wavlm"], modules["weighted_sum"], modules["ser_head"], modules["ctc_head"],
                          classes=model.classes)
    got = model.predict(files[:4], progress=False)
    want = expected.predict(files[:4], progress=False)
    assert [r["transcript"] for r in got] == [r["transcript"] for r in want]
    assert all(isinstance(r["transcript"], str) and r["transcript"] for r in got)
    assert _max_diff(got, want) < 1e-6
