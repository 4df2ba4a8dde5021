"""HarmoniFuse recipe: train.py end to end on the mini corpora (tiny WavLM + tiny LM), and its scoring helpers."""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lobes import metrics as M
from lobes.errors import DataError
from lobes.hparams_io import resolve_row
from lobes.harmonifuse.speech_lm import FixedLayerSelect, TrainableParameters, rescale_layer_index

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/MSP-Podcast/harmonifuse"
PYTHON = ROOT / ".venv/bin/python"


@pytest.fixture(scope="module")
def recipe(load_recipe):
    return load_recipe("recipes/MSP-Podcast/harmonifuse/train.py")


# ------------------------------------------------------------------------------------------ SER scoring
def test_emotion_index_accepts_exact_class_names_only(recipe):
    classes = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
    assert recipe.emotion_index("Anger", classes) == 0
    assert recipe.emotion_index("  Surprise\n", classes) == 7
    for bad in ("anger", "", "Angerr", "Anger Fear", "<unk>"):
        assert recipe.emotion_index(bad, classes) == 8  # invalid
    assert recipe.emotion_index("Surprise", classes[:4]) == 4  # not among a 4-class recipe's classes


def test_invalid_outputs_count_as_wrong_but_are_not_a_class(recipe):
    # true [A, A, C, C], pred [A, invalid, C, A]
    rep = recipe.ser_report_with_invalid([0, 0, 1, 1], [0, 8, 1, 0], 8, num_bootstraps=20)
    assert rep["uar"] == pytest.approx(0.5)          # recall A = 1/2, C = 1/2
    assert rep["accuracy"] == pytest.approx(0.5)     # 2 of 4
    # precision A = 1/2 (predicted twice), C = 1/1; the invalid column is not averaged in (it would give 0.5)
    assert rep["precision"] == pytest.approx(0.75)
    # F1 A = 2*1/(2+2) = 0.5, F1 C = 2*1/(2+1) = 2/3
    assert rep["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert rep["n_invalid"] == 1 and rep["n"] == 4
    assert rep["per_class_recall"][:2] == [0.5, 0.5] and len(rep["per_class_recall"]) == 8
    assert rep["confusion"][0][8] == 1 and len(rep["confusion"]) == 9
    for k in ("uar", "precision", "macro_f1"):
        lo, hi = rep[f"{k}_ci"]
        assert 0 <= lo <= hi <= 1


def test_without_invalid_outputs_the_report_equals_ser_report(recipe):
    rng = np.random.RandomState(0)
    t, p = rng.randint(0, 8, 60).tolist(), rng.randint(0, 8, 60).tolist()
    mine = recipe.ser_report_with_invalid(t, p, 8, num_bootstraps=50, seed=3)
    ref = M.ser_report(t, p, num_bootstraps=50, seed=3)
    for k in ("uar", "precision", "macro_f1", "accuracy"):
        assert mine[k] == pytest.approx(ref[k], abs=1e-12)
    for k in ("uar_ci", "precision_ci", "macro_f1_ci"):
        assert mine[k] == pytest.approx(ref[k], abs=1e-12)
    assert mine["n_invalid"] == 0


def test_bad_task_settings_are_refused_before_any_work(recipe):
    ok = {"train_tasks": ["asr", "ser"], "interleave_ratio": {"asr": 2, "ser": 1}, "libri_test_splits": ["test-clean"]}
    recipe.check_hparams(ok)
    for change, msg in (({"train_tasks": ["asr", "sv"]}, "subset of"), ({"train_tasks": []}, "subset of"),
                        ({"interleave_ratio": {"asr": 1, "ser": 0}}, r"task\(s\) \['ser'\]"),
                        ({"libri_test_splits": []}, "libri_test_splits is empty")):
        with pytest.raises(DataError, match=msg):
            recipe.check_hparams({**ok, **change})
    recipe.check_hparams({**ok, "train_tasks": ["ser"], "libri_test_splits": []})  # SER-only needs no ASR test


# ------------------------------------------------------------------------------------------ helpers in the lobes
def test_fixed_layer_rescaling_and_selection():
    assert rescale_layer_index(12, 4, 24) == 2 and rescale_layer_index(24, 4, 24) == 4
    assert rescale_layer_index(12, 24, 24) == 12 and rescale_layer_index(7, 4, None) == 7
    assert rescale_layer_index(1, 4, 24) == 1  # round(1/6) = 0 is not a layer: clamped to 1
    assert rescale_layer_index(None, 4, 24) is None
    with pytest.raises(DataError, match="outside 1..24"):
        rescale_layer_index(30, 4, 24)
    sel = FixedLayerSelect(2, num_layers=4, hidden_size=3)
    hs = torch.randn(5, 2, 6, 3)
    assert torch.equal(sel(hs, "ser"), hs[2])
    assert sel.layer_weights("asr").tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(DataError, match="fixed_layer=5"):
        FixedLayerSelect(5, num_layers=4, hidden_size=3)


def test_sequential_eval_loader_scores_every_item_once_without_mixing():
    from speechbrain.dataio.dataset import DynamicItemDataset
    from torch.utils.data import BatchSampler, SequentialSampler

    from lobes.harmonifuse.interleave import batch_task, make_sequential_dataloader

    sets = {}
    for task, n in (("asr:test-clean", 5), ("ser:test", 7)):
        ds = DynamicItemDataset({f"{task}_{i}": {"x": float(i)} for i in range(n)})
        ds.add_dynamic_item(lambda x: torch.tensor([x]), takes=["x"], provides="sig")
        ds.set_output_keys(["id", "sig"])
        sets[task] = ds
    samplers = {t: BatchSampler(SequentialSampler(ds), 3, drop_last=False) for t, ds in sets.items()}
    loader = make_sequential_dataloader(sets, samplers)
    got = [(batch_task(b), list(b.id)) for b in loader]
    assert len(loader) == 2 + 3 and len(got) == 5
    assert [t for t, _ in got] == ["asr:test-clean"] * 2 + ["ser:test"] * 3
    ids = [i for _, b in got for i in b]
    assert sorted(ids) == sorted(f"{t}_{i}" for t, ds in sets.items() for i in range(len(ds)))


def test_trainable_parameters_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)  # "frozen LM": not saved
    rec = TrainableParameters(net)
    rec.save(tmp_path / "p.ckpt")
    assert sorted(load_file(str(tmp_path / "p.ckpt"))) == ["1.bias", "1.weight"]
    saved = net[1].weight.detach().clone()
    with torch.no_grad():
        net[1].weight.zero_()
    rec.load(tmp_path / "p.ckpt")
    assert torch.equal(net[1].weight, saved)
    net[0].requires_grad_(True)  # a differently frozen model must not silently load it
    with pytest.raises(DataError, match="missing"):
        rec.load(tmp_path / "p.ckpt")


def test_rows_override_only_their_keys():
    import ruamel.yaml

    base = ruamel.yaml.YAML().load((RECIPE / "hparams/harmonifuse.yaml").read_text())
    expect = {"full": {}, "single_task_asr": {"train_tasks": ["asr"], "msp_folder": None},
              "single_task_ser": {"train_tasks": ["ser"], "libri_folder": None},
              "fixed_layer_12": {"fixed_layer": 12}, "fixed_layer_24": {"fixed_layer": 24},
              "static_encoder_fusion": {"lm_fusion": "last"}, "static_lm_fusion": {"lm_fusion": "static"}}
    assert sorted(p.stem for p in (RECIPE / "hparams/rows").glob("*.yaml")) == sorted(expect)
    assert base["fixed_layer"] is None and base["lm_fusion"] == "dynamic"
    assert list(base["train_tasks"]) == ["asr", "ser"]
    for row, keys in expect.items():
        path = RECIPE / f"hparams/rows/{row}.yaml"
        own = ruamel.yaml.YAML().load(path.read_text())
        assert own["base_hparams"] == "../harmonifuse.yaml" and own["experiment"] == row
        assert set(own) == {"base_hparams", "experiment", "table_rows", *keys}, row
        merged = ruamel.yaml.YAML().load(resolve_row(path))  # raises on a key the base lacks
        for k, v in keys.items():
            assert (list(merged[k]) if k == "train_tasks" else merged[k]) == v, (row, k)
        assert len(merged["table_rows"]) == 1 and merged["table_rows"][0]["part"] == "HarmoniFuse ablations"


# ------------------------------------------------------------------------------------------ train.py end to end
N_EVAL = {"msp": 16, "libri": 8}  # evaluation subsets: 2 utterances per emotion class, 8 LibriSpeech utterances


def _subset_manifests(src, dst, keep):
    """Copy the prepared manifests; ``keep[split]`` picks the utterances of the smaller evaluation sets."""
    dst.mkdir(parents=True)
    for path in src.glob("*.json"):
        data = json.loads(path.read_text())
        pick = keep.get(path.stem)
        (dst / path.name).write_text(json.dumps(pick(data) if pick else data))
    return dst


def _two_per_class(data):
    out, seen = {}, {}
    for utt, entry in sorted(data.items()):
        if seen.get(entry["emo"], 0) < 2:
            seen[entry["emo"]] = seen.get(entry["emo"], 0) + 1
            out[utt] = entry
    return out


@pytest.fixture(scope="module")
def trained(mini_corpora, msp_manifests, libri_manifests, tmp_path_factory):
    """One training run of the full row: 4 interleaved batches (2 ASR, 2 SER), then validation and test."""
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm

    root = tmp_path_factory.mktemp("harmonifuse")
    wavlm, lm = make_tiny_wavlm(root / "wavlm"), make_tiny_lm(root / "lm")
    first = lambda n: (lambda d: dict(sorted(d.items())[:n]))  # noqa: E731
    msp = _subset_manifests(msp_manifests, root / "msp", {"valid": _two_per_class, "test": _two_per_class})
    libri = _subset_manifests(libri_manifests, root / "libri", {"dev-clean": first(8), "test-clean": first(8)})
    out = root / "exp"
    cmd = [str(PYTHON), str(RECIPE / "train.py"), str(RECIPE / "hparams/rows/full.yaml"),
           "--msp_folder", str(mini_corpora.msp), "--libri_folder", str(mini_corpora.libri),
           "--skip_prep=True", f"--msp_prep_folder={msp}", f"--libri_prep_folder={libri}",
           f"--wavlm_source={wavlm}", f"--lm_source={lm}", f"--output_folder={out}",
           "--number_of_epochs=1", "--interleave_length=4", "--asr_batch_size=8", "--ser_batch_size=8",
           "--lr=0.01", "--asr_max_decode_len=20", "--ser_max_decode_len=10", "--num_bootstraps=20",
           "--device=cpu", "--noprogressbar"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_recipe_writes_checkpoint_of_trainable_parameters_only(trained):
    ckpts = list((trained / "save").glob("CKPT+*"))
    assert len(ckpts) == 1 and (ckpts[0] / "CKPT.yaml").is_file()
    state = load_file(str(ckpts[0] / "speech_lm.ckpt"))
    assert state["encoder_fusion.layer_logits"].shape == (2, 4)         # 2 tasks x 4 tiny WavLM layers
    assert state["prompts"].shape == (2, 4, 32)                         # 4 prompt vectors per task, LM width 32
    assert any(k.startswith("encoder.model.encoder.layers.") for k in state)  # WavLM fine-tuned ...
    assert not any(k.startswith("encoder.model.feature_extractor.") for k in state)  # ... but not its CNN
    assert not any(k.startswith("lm.") for k in state)                  # the frozen LM is never copied


def test_recipe_metrics_hold_wer_ua_wa(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert math.isfinite(m["wer"]) and m["wer"] >= 0.0
    assert m["wer_split"] == "test-clean"
    assert m["wer_by_split"]["test-clean"]["n_utts"] == N_EVAL["libri"]
    n_test = N_EVAL["msp"]
    t = m["test"]
    assert [sum(row) for row in t["confusion"]] == [2] * 8 + [0]  # 2 per class; nothing is truly "invalid"
    assert t["n"] == n_test == sum(map(sum, t["confusion"]))
    for k in ("ua", "wa", "macro_f1"):
        assert 0.0 <= m[k] <= 1.0
    assert m["ua"] == t["uar"] and m["wa"] == t["accuracy"]
    assert m["invalid_rate"] == pytest.approx(t["n_invalid"] / t["n"])
    assert t["classes"][-1] == "<invalid>" and len(t["classes"]) == 9
    rows = (trained / "ser_predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + n_test


def test_recipe_fusion_weights_are_distributions_per_task(trained):
    fw = json.loads((trained / "fusion_weights.json").read_text())
    assert fw["tasks"] == ["asr", "ser"] and fw["encoder_fusion"].startswith("gated")
    for task in ("asr", "ser"):
        enc = fw["encoder"][task]
        assert len(enc) == 4 and all(w >= 0 for w in enc) and sum(enc) == pytest.approx(1.0, abs=1e-5)
        lm = fw["lm_dynamic_mean"][task]
        assert len(lm) == 4 and sum(lm) == pytest.approx(1.0, abs=1e-5)
    # the mean dynamic weights are over exactly the test utterances of each task (one forward pass each)
    assert fw["lm_dynamic_count"] == {"asr": N_EVAL["libri"], "ser": N_EVAL["msp"]}
    for png in ("encoder_layer_weights.png", "lm_fusion_weights.png", "confusion.png"):
        assert (trained / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_encoder_weights_differ_between_tasks_after_training(trained):
    """Both tasks start from the same uniform α; batch-interleaved training moves each by its own task's data."""
    fw = json.loads((trained / "fusion_weights.json").read_text())
    asr, ser = np.array(fw["encoder"]["asr"]), np.array(fw["encoder"]["ser"])
    assert np.abs(asr - 0.25).max() > 1e-4 and np.abs(ser - 0.25).max() > 1e-4
    assert np.abs(asr - ser).max() > 1e-4
