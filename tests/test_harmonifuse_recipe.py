"""HarmoniFuse recipe: train.py end to end on the mini corpora (tiny WavLM + tiny LM), and its scoring helpers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harmonifuse_run import N_EVAL  # tests/ is on sys.path (pytest rootdir conftest)
from harmonifuse_run import subset_manifests as _subset_manifests
from lobes import metrics as M
from lobes.errors import DataError
from lobes.hparams_io import resolve_row
from lobes.harmonifuse import data as HD
from lobes.harmonifuse.checkpoint import TrainableParameters
from lobes.harmonifuse.layer_select import FixedLayerSelect, rescale_layer_index
from lobes.harmonifuse.reporting import emotion_index, ser_report_with_invalid
from lobes.harmonifuse.task_split import TaskSplit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/MSP-Podcast/harmonifuse"
PYTHON = sys.executable  # the interpreter running the tests: any environment, not only <repo>/.venv


@pytest.fixture(scope="module")
def recipe(load_recipe):
    return load_recipe("recipes/MSP-Podcast/harmonifuse/train.py")


# ------------------------------------------------------------------------------------------ SER scoring
def test_emotion_index_accepts_exact_class_names_only():
    classes = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
    assert emotion_index("Anger", classes) == 0
    assert emotion_index("  Surprise\n", classes) == 7
    for bad in ("anger", "", "Angerr", "Anger Fear", "<unk>"):
        assert emotion_index(bad, classes) == 8  # invalid
    assert emotion_index("Surprise", classes[:4]) == 4  # not among a 4-class recipe's classes


def test_invalid_outputs_count_as_wrong_but_are_not_a_class():
    # true [A, A, C, C], pred [A, invalid, C, A]
    rep = ser_report_with_invalid([0, 0, 1, 1], [0, 8, 1, 0], 8, num_bootstraps=20)
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


def test_without_invalid_outputs_the_report_equals_ser_report():
    rng = np.random.RandomState(0)
    t, p = rng.randint(0, 8, 60).tolist(), rng.randint(0, 8, 60).tolist()
    mine = ser_report_with_invalid(t, p, 8, num_bootstraps=50, seed=3)
    ref = M.ser_report(t, p, num_bootstraps=50, seed=3)
    for k in ("uar", "precision", "macro_f1", "accuracy"):
        assert mine[k] == pytest.approx(ref[k], abs=1e-12)
    for k in ("uar_ci", "precision_ci", "macro_f1_ci"):
        assert mine[k] == pytest.approx(ref[k], abs=1e-12)
    assert mine["n_invalid"] == 0


def test_bad_task_settings_are_refused_before_any_work():
    ok = {"train_tasks": ["asr", "ser"], "interleave_ratio": {"asr": 2, "ser": 1}, "libri_test_splits": ["test-clean"],
          "ser_extra_sources": {}, "ser_corpus": "msp_podcast", "iemocap_fold": 1}
    HD.check_hparams(ok)
    for change, msg in (({"train_tasks": ["asr", "sv"]}, "subset of"), ({"train_tasks": []}, "subset of"),
                        ({"interleave_ratio": {"asr": 1, "ser": 0}}, r"task\(s\) \['ser'\]"),
                        ({"libri_test_splits": []}, "libri_test_splits is empty"),
                        ({"ser_extra_sources": {"emilia": "x.json"}}, r"extra SER source\(s\) \['ser:emilia'\]"),
                        ({"ser_extra_sources": {"e": "x.json"}, "train_tasks": ["asr"]}, "need 'ser' in train_tasks"),
                        ({"ser_corpus": "iemocap", "iemocap_fold": 6}, "iemocap_fold must be a session number"),
                        ({"ser_corpus": "crema"}, "ser_corpus must be")):
        with pytest.raises(DataError, match=msg):
            HD.check_hparams({**ok, **change})
    HD.check_hparams({**ok, "train_tasks": ["ser"], "libri_test_splits": []})  # SER-only needs no ASR test
    HD.check_hparams({**ok, "ser_extra_sources": {"emilia": "x.json"},
                          "interleave_ratio": {"asr": 1, "ser": 1, "ser:emilia": 2}})


def test_iemocap_fold_is_the_ser_corpus_of_the_iemocap_row(recipe, iemocap_manifests, mini_iemocap, tmp_path):
    """ser_corpus iemocap: train/valid/test = the prepared fold's manifests, 4 classes checked against classes.txt."""
    h = {"train_tasks": ["ser"], "ser_corpus": "iemocap", "iemocap_prep_folder": str(iemocap_manifests),
         "iemocap_fold": 2, "iemocap_folder": str(mini_iemocap.root), "ser_extra_sources": {},
         "emotion_classes": ["neu", "hap", "ang", "sad"], "interleave_ratio": {"ser": 1}, "libri_test_splits": []}
    HD.check_hparams(h)
    ds = HD.build_datasets(h)
    for split, tag in (("train", "ser"), ("valid", "ser:valid"), ("test", "ser:test")):
        manifest = json.loads((iemocap_manifests / "fold2" / f"{split}.json").read_text())
        assert [str(t) for t in ds[split]] == [tag] and len(ds[split][TaskSplit.parse(tag)]) == len(manifest) > 0
    test_set = ds["test"][TaskSplit("ser", "test")]
    test_ids = {test_set[i]["spk_id"] for i in range(len(test_set))}
    assert test_ids == {"Ses02_F", "Ses02_M"}  # fold 2 tests on Session 2
    with pytest.raises(DataError, match="differ from the prepared IEMOCAP classes"):
        HD.build_datasets({**h, "emotion_classes": ["ang", "hap", "neu", "sad"]})
    # prepare() writes the fold from the corpus itself
    recipe.prepare({**h, "iemocap_prep_folder": str(tmp_path / "prep"), "iemocap_fold": 3})
    assert json.loads((tmp_path / "prep" / "fold3" / "test.json").read_text()) == \
        json.loads((iemocap_manifests / "fold3" / "test.json").read_text())


def test_an_extra_ser_source_is_interleaved_at_its_ratio(msp_manifests, libri_manifests, tmp_path):
    """asr : ser : ser:pseudo = 1 : 1 : 2 over 3 sources; pseudo batches are SER batches of their own manifest."""
    from lobes.harmonifuse.interleave import batch_task

    data = json.loads((msp_manifests / "train.json").read_text())
    pseudo = {f"pseudo_{k}": v for k, v in sorted(data.items())[:6]}
    (tmp_path / "pseudo.json").write_text(json.dumps(pseudo))
    h = {"train_tasks": ["asr", "ser"], "ser_extra_sources": {"pseudo": str(tmp_path / "pseudo.json")},
         "pseudo_label_threshold": 0.0,
         "interleave_ratio": {"asr": 1, "ser": 1, "ser:pseudo": 2}, "interleave_length": 8,
         "interleave_order": "round_robin", "seed": 1, "num_workers": 0, "dynamic_batching": False,
         "asr_batch_size": 2, "ser_batch_size": 2, "libri_prep_folder": str(libri_manifests),
         "libri_train_splits": ["train-clean-100"], "libri_valid_split": "dev-clean",
         "libri_test_splits": ["test-clean"], "msp_prep_folder": str(msp_manifests),
         "ser_corpus": "msp_podcast", "iemocap_fold": 1,
         "emotion_classes": ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]}
    HD.check_hparams(h)
    assert HD.train_sources(h) == [TaskSplit("asr"), TaskSplit("ser"), TaskSplit("ser", "pseudo")]
    assert [str(t) for t in HD.train_sources(h)] == ["asr", "ser", "ser:pseudo"]
    train, _, _ = HD.make_loaders(h, HD.build_datasets(h))
    tags = []
    for batch in train:
        tags.append(str(batch_task(batch)))
        if tags[-1] == "ser:pseudo":
            assert all(i.startswith("pseudo_") for i in batch.id) and batch.emo_idx.data.shape == (2, 1)
    assert tags == ["asr", "ser", "ser:pseudo", "ser:pseudo"] * 2
    with pytest.raises(DataError, match="ser_extra_sources.gone: manifest"):
        HD.build_datasets({**h, "ser_extra_sources": {"gone": str(tmp_path / "none.json")}})


# DDP training shares of the global batches: tests/test_harmonifuse_ddp_train.py


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
              "static_encoder_fusion": {"lm_fusion": "last"}, "static_lm_fusion": {"lm_fusion": "static"},
              "lm_frozen": {"lm_mode": "frozen"},
              "lm_full": {"lm_mode": "full", "backbone_modules": ["speech_lm.encoder", "speech_lm.lm"]},
              "soft_prompts": {"prompt_mode": "soft"}, "channel_gate": {"encoder_gate": "channel"},
              "gpu_llm_lora": {"lm_source": "Qwen/Qwen2.5-0.5B", "lm_mode": "lora", "lm_dtype": "bfloat16",
                               "lm_gradient_checkpointing": True, "lm_attn_implementation": "sdpa",
                               "precision": "bf16", "gradient_checkpointing": True},
              "iemocap_ser": {"ser_corpus": "iemocap", "msp_folder": None,
                              "emotion_classes": ["neu", "hap", "ang", "sad"], "datasets": ["LibriSpeech", "IEMOCAP"]}}
    for task, other in (("asr", "msp_folder"), ("ser", "libri_folder")):
        for layer in (12, 24):  # the paper's first experiment: single task, fixed WavLM layer 12 or 24
            expect[f"single_task_{task}_layer{layer}"] = {"train_tasks": [task], other: None, "fixed_layer": layer}
    assert sorted(p.stem for p in (RECIPE / "hparams/rows").glob("*.yaml")) == sorted(expect)
    # paper-faithful defaults: softmax layer sum without gate, prompt words, dynamic LM fusion; LoRA is assumed
    assert base["fixed_layer"] is None and base["lm_fusion"] == "dynamic" and base["encoder_gate"] == "none"
    assert base["lm_fusion_form"] == "simplex"  # chosen on validation (README, "The exact fusion forms")
    assert base["prompt_mode"] == "text" and base["lm_mode"] == "lora" and base["num_beams"] == 1
    assert dict(base["task_prompts"]) == {"asr": "Transcribe the audio.",
                                          "ser": "Which emotion does the speaker express?"}
    assert list(base["train_tasks"]) == ["asr", "ser"] and list(base["backbone_modules"]) == ["speech_lm.encoder"]
    for row, keys in expect.items():
        path = RECIPE / f"hparams/rows/{row}.yaml"
        own = ruamel.yaml.YAML().load(path.read_text())
        assert own["base_hparams"] == "../harmonifuse.yaml" and own["experiment"] == row
        assert set(own) == {"base_hparams", "experiment", "table_rows", *keys}, row
        merged = ruamel.yaml.YAML().load(resolve_row(path))  # raises on a key the base lacks
        for k, v in keys.items():
            assert (list(merged[k]) if isinstance(v, list) else merged[k]) == v, (row, k)
        assert len(merged["table_rows"]) == (2 if row == "full" else 1), row
        assert merged["table_rows"][0]["part"].startswith("HarmoniFuse")


def test_wer_ci_pools_errors_over_resampled_utterances():
    refs, hyps = ["A B C D", "E F", "G H I", ""], ["A B X D", "E", "G H I J", "K"]
    wer, (lo, hi) = M.wer_ci(refs, hyps, num_bootstraps=200)
    assert wer == pytest.approx(4 / 9) == pytest.approx(M.wer(refs, hyps))  # 1 sub + 1 del + 2 ins over 9 words
    assert lo <= wer <= hi and lo >= 0.0
    assert M.wer_ci(["A B"], ["A B"], num_bootstraps=20) == (0.0, [0.0, 0.0])


def test_ddp_unused_parameter_search_only_for_the_classify_head():
    base = {"ser_mode": "generate", "train_tasks": ["asr", "ser"]}
    assert not HD.needs_unused_parameter_search(base)
    assert HD.needs_unused_parameter_search({**base, "ser_mode": "classify"})
    assert not HD.needs_unused_parameter_search({"ser_mode": "classify", "train_tasks": ["ser"]})


# ------------------------------------------------------------------------------------------ train.py end to end
@pytest.fixture
def trained(harmonifuse_trained):
    """The session's one training run of the full row (tests/harmonifuse_run.py, fixture in conftest.py)."""
    return harmonifuse_trained


def test_recipe_writes_checkpoint_of_trainable_parameters_only(trained):
    ckpts = list((trained / "save").glob("CKPT+*"))
    assert len(ckpts) == 1 and (ckpts[0] / "CKPT.yaml").is_file()
    state = load_file(str(ckpts[0] / "speech_lm.ckpt"))
    assert state["encoder_fusion.layer_logits"].shape == (2, 4)         # 2 tasks x 4 tiny WavLM layers
    assert "encoder_fusion.gate_logits" not in state and "prompts" not in state  # no gate; prompt words
    assert any(k.startswith("encoder.model.encoder.layers.") for k in state)  # WavLM fine-tuned ...
    assert not any(k.startswith("encoder.model.feature_extractor.") for k in state)  # ... but not its CNN
    assert "encoder.model.masked_spec_embed" not in state               # unused: frozen (DDP)
    lm = sorted(k for k in state if k.startswith("lm."))                # only the LoRA adapters of the LM:
    # lora_target_modules all-linear: 4 layers x (q, k, v, o, gate, up, down) x A, B
    assert len(lm) == 4 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in lm)
    assert {state[k].shape for k in lm} == {(8, 32), (32, 8), (8, 64), (64, 8)}  # rank 8; LM width 32, MLP 64


def test_recipe_metrics_hold_wer_ua_wa(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert math.isfinite(m["wer"]) and m["wer"] >= 0.0
    assert m["wer_split"] == "test-clean"
    assert m["wer_by_split"]["test-clean"]["n_utts"] == N_EVAL["libri"]
    lo, hi = m["wer_clean_ci"]
    assert m["wer_clean"] == m["wer"] and lo <= m["wer"] <= hi and m["wer_by_split"]["test-clean"]["wer_ci"] == [lo, hi]
    assert m["lm_mode"] == "lora" and m["prompt_mode"] == "text"
    n_test = N_EVAL["msp"]
    t = m["test"]
    assert [sum(row) for row in t["confusion"]] == [2] * 8 + [0]  # 2 per class; nothing is truly "invalid"
    assert t["n"] == n_test == sum(map(sum, t["confusion"]))
    for k in ("ua", "wa", "macro_f1"):
        assert 0.0 <= m[k] <= 1.0
    assert m["ua"] == t["uar"] and m["wa"] == t["accuracy"]
    assert t["accuracy_ci"][0] <= t["accuracy"] <= t["accuracy_ci"][1]
    assert m["invalid_rate"] == pytest.approx(t["n_invalid"] / t["n"])
    assert t["classes"][-1] == "<invalid>" and len(t["classes"]) == 9
    rows = (trained / "ser_predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + n_test


def test_recipe_fusion_weights_are_distributions_per_task(trained):
    fw = json.loads((trained / "fusion_weights.json").read_text())
    assert fw["tasks"] == ["asr", "ser"] and fw["encoder_fusion"] == "weighted sum (no gate)"
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


def test_infer_cli_names_a_corrupt_file_and_predicts_the_rest(trained, mini_corpora, load_recipe, tmp_path, capsys):
    import soundfile as sf

    infer = load_recipe("recipes/MSP-Podcast/harmonifuse/infer.py")
    wavs = sorted(Path(mini_corpora.libri).rglob("*.flac"))[:2] or sorted(Path(mini_corpora.libri).rglob("*.wav"))[:2]
    assert len(wavs) == 2
    # one of them at 8 kHz stereo: any sample rate and channel count is accepted
    data, sr = sf.read(str(wavs[1]), dtype="float32")
    sf.write(str(tmp_path / "stereo_8k.wav"), np.stack([data[::2], data[::2]], 1), sr // 2)
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00not really audio")
    out = tmp_path / "out.json"
    rc = infer.main(["--model", str(trained), str(wavs[0]), str(tmp_path / "stereo_8k.wav"), str(bad),
                     "--json", str(out)])
    assert rc == 1  # one file failed, the others were predicted
    res = {Path(r["file"]).name: r for r in json.loads(out.read_text())}
    assert set(res) == {wavs[0].name, "stereo_8k.wav", "corrupt.wav"}
    assert "corrupt.wav" in res["corrupt.wav"]["error"] and "transcript" not in res["corrupt.wav"]
    classes = {"Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise", "<invalid>"}
    for name in (wavs[0].name, "stereo_8k.wav"):
        assert "error" not in res[name] and isinstance(res[name]["transcript"], str)
        assert res[name]["emotion"] in classes
    assert "corrupt.wav" in capsys.readouterr().err


def test_infer_source_overrides_reach_the_modules(trained, load_recipe, tmp_path, capsys):
    """--lm_source replaces the base LM source the shared artefacts name; the fine-tuned WavLM is in
    speech_modules.safetensors, so a --wavlm_source (for a frozen, referenced WavLM) reads nothing here."""
    infer = load_recipe("recipes/MSP-Podcast/harmonifuse/infer.py")
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(str(wav), np.zeros(8000, dtype="float32"), 16000)
    moved = tmp_path / "moved_lm"
    assert infer.main(["--model", str(trained), "--lm_source", str(moved), str(wav)]) == 2
    assert str(moved) in capsys.readouterr().err  # the override was used (and names the missing folder)
    assert infer.main(["--model", str(trained), "--wavlm_source", str(tmp_path / "moved_wavlm"), str(wav)]) == 0


def test_ddp_two_gloo_processes_train_the_full_row(mini_corpora, msp_manifests, libri_manifests, tmp_path):
    """`full` row (LoRA LM, fine-tuned WavLM) on 2 gloo processes, find_unused_parameters off: DDP raises at a
    rank's second step if any trainable parameter got no gradient in the first (e.g. masked_spec_embed). Each
    rank trains on half of every global batch; evaluation is sharded (3 test batches: 2 on rank 0, 1 on
    rank 1) and gathered: a 1-process test of the same checkpoint writes the same metrics.json."""
    import shutil

    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm, lm = make_tiny_wavlm(tmp_path / "wavlm"), make_tiny_lm(tmp_path / "lm")
    # as in WavLM-Large: mask_time_prob > 0 gives the model a masked_spec_embed parameter (SpecAugment itself
    # stays off in load_wavlm, so nothing uses it); the tiny config has none
    cfg = json.loads((wavlm / "config.json").read_text())
    (wavlm / "config.json").write_text(json.dumps({**cfg, "mask_time_prob": 0.05}))
    first = lambda n: (lambda d: dict(sorted(d.items())[:n]))  # noqa: E731
    msp = _subset_manifests(msp_manifests, tmp_path / "msp", {"train": first(16), "valid": first(2), "test": first(2)})
    libri = _subset_manifests(libri_manifests, tmp_path / "libri", {"train-clean-100": first(16),
                                                                    "dev-clean": first(2), "test-clean": first(4)})
    out = tmp_path / "exp"
    args = [str(RECIPE / "train.py"), str(RECIPE / "hparams/rows/full.yaml"),
            "--msp_folder", str(mini_corpora.msp), "--libri_folder", str(mini_corpora.libri),
            "--skip_prep=True", f"--msp_prep_folder={msp}", f"--libri_prep_folder={libri}",
            f"--wavlm_source={wavlm}", f"--lm_source={lm}",
            "--number_of_epochs=1", "--interleave_length=4", "--asr_batch_size=2", "--ser_batch_size=2",
            "--lr=0.01", "--asr_max_decode_len=3", "--ser_max_decode_len=3", "--num_bootstraps=5",
            "--device=cpu", "--noprogressbar"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
           f"--output_folder={out}", "--distributed_backend=gloo"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpt = next((out / "save").glob("CKPT+*"))
    state = load_file(str(ckpt / "speech_lm.ckpt"))
    assert np.abs(state["encoder_fusion.layer_logits"].numpy()).max() > 1e-4   # the ranks' steps trained it
    assert "encoder.model.masked_spec_embed" not in state
    # interleave_length 4 (steps of global batches of 2): each rank 4 steps of one utterance;
    # validation 1 ASR + 1 SER batch: one each; test 2 ASR + 1 SER batches: rank 0 the 1st and 3rd
    log = (out / "train_log.txt").read_text()
    assert "train batches: [4, 4]" in log and "valid batches: [1, 1]" in log and "test batches: [2, 1]" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["wer_by_split"]["test-clean"]["n_utts"] == 4 and metrics["test"]["n"] == 2  # all ranks' outputs
    fusion = json.loads((out / "fusion_weights.json").read_text())
    assert fusion["lm_dynamic_count"] == {"asr": 4, "ser": 2}                 # summed over the ranks
    # the same checkpoint tested by one process (training is done: fit resumes after epoch 1 and stops)
    single = tmp_path / "exp1"
    shutil.copytree(out, single)
    (single / "metrics.json").unlink()
    proc = subprocess.run([PYTHON, *args, f"--output_folder={single}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((single / "metrics.json").read_text()) == metrics
    assert (single / "train_log.txt").read_text().endswith("test batches: [3]\n")  # one process: all 3
    assert (single / "asr_predictions.csv").read_text() == (out / "asr_predictions.csv").read_text()
    assert json.loads((single / "fusion_weights.json").read_text())["lm_dynamic_count"] == fusion["lm_dynamic_count"]


def test_model_card_and_results_table_show_the_run(trained, load_recipe, tmp_path):
    card_mod = load_recipe("recipes/MSP-Podcast/harmonifuse/model_card.py")
    table_mod = load_recipe("recipes/MSP-Podcast/harmonifuse/make_table.py")
    m = json.loads((trained / "metrics.json").read_text())
    card = card_mod.model_card(trained)
    import ruamel.yaml.constructor as C  # reading the card's YAML must not change how every later YAML is read
    for cls in (C.BaseConstructor, C.SafeConstructor, C.RoundTripConstructor):
        assert "!" not in cls.yaml_multi_constructors, cls
    lo, hi = m["wer_clean_ci"]
    assert f"| WER test-clean | {100 * m['wer']:.2f} ± {100 * (hi - lo) / 2:.2f} |" in card
    assert f"| UA (unweighted accuracy) | {100 * m['ua']:.2f} ±" in card and "| WA (accuracy) |" in card
    assert "| LM training: frozen | lora | full (`lm_mode`) | lora |" in card
    assert "Transcribe the audio." in card and "encoder_layer_weights.png" in card
    table = table_mod.make_table([trained / "metrics.json"])
    row = next(line for line in table.splitlines() if line.startswith("| HarmoniFuse (encoder layer sum"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{100 * m['wer']:.2f} ± {100 * (hi - lo) / 2:.2f}" and cells[2] == "–"  # no test-other
    t = m["test"]
    assert cells[3] == f"{100 * t['uar']:.2f} ± {100 * (t['uar_ci'][1] - t['uar_ci'][0]) / 2:.2f}"
    assert cells[4].startswith(f"{100 * t['accuracy']:.2f} ±") and cells[5].startswith(f"{100 * t['macro_f1']:.2f}")
    assert "### HarmoniFuse: LM training mode" in table and "| LoRA (default) |" in table  # full.yaml's 2nd row


# ------------------------------------------------------------------------------------------ task tags and losses
def test_task_split_tags_round_trip_and_refuse_unknown_tasks():
    for text, value in (("asr", TaskSplit("asr")), ("ser:emilia", TaskSplit("ser", "emilia")),
                        ("asr:test-clean", TaskSplit("asr", "test-clean")), ("ser:valid", TaskSplit("ser", "valid"))):
        assert TaskSplit.parse(text) == value and str(value) == text and TaskSplit.parse(value) is value
    assert TaskSplit("asr") != TaskSplit("asr", "test-clean") and len({TaskSplit("ser"), TaskSplit.parse("ser")}) == 1
    with pytest.raises(DataError, match="unknown task 'sv' in task tag 'sv:test'"):
        TaskSplit.parse("sv:test")


def test_combined_loss_counts_each_task_once_whatever_its_splits_and_batches():
    from lobes.harmonifuse.task_losses import TaskLosses

    ev = TaskLosses()
    for i, (tag, loss) in enumerate((("asr:test-clean", 1.0), ("asr:test-clean", 3.0), ("asr:test-other", 4.0),
                                     ("ser:test", 0.5), ("ser:test", 1.5), ("ser:test", 1.0))):
        ev.add_eval([f"u{i}a", f"u{i}b"], TaskSplit.parse(tag), torch.tensor(loss))  # a batch counts once
    means = {str(t): v for t, v in ev.means().items()}
    assert means == {"asr:test-clean": 2.0, "asr:test-other": 4.0, "ser:test": 1.0}
    assert ev.combined() == pytest.approx((2.0 + 4.0) / 2 + 1.0, abs=1e-12)   # ASR splits averaged, then + SER
    tr = TaskLosses()
    for tag, loss in (("asr", 2.0), ("ser", 1.0), ("ser:pseudo", 3.0), ("asr", 4.0)):
        tr.add_train(TaskSplit.parse(tag), torch.tensor(loss))
    assert {str(t): v for t, v in tr.means().items()} == {"asr": 3.0, "ser": 1.0, "ser:pseudo": 3.0}
    assert tr.combined() == pytest.approx(3.0 + (1.0 + 3.0) / 2, abs=1e-12)


def test_each_split_output_is_gathered_against_its_split_and_a_dropped_utterance_fails_naming_it():
    """Per-split collectors are checked against the split's evaluated utterances (from the gathered per-utterance
    losses): an SER output lost for one utterance fails loudly instead of being scored on a subset."""
    from lobes.harmonifuse import reporting as R
    from lobes.harmonifuse.task_losses import TaskLosses

    classes = ["Anger", "Neutral"]
    asr, ser = TaskSplit("asr", "test-clean"), TaskSplit("ser", "test")
    losses = TaskLosses()
    losses.add_eval(["a1", "a2"], asr, torch.tensor(2.0))
    losses.add_eval(["s1", "s2"], ser, torch.tensor(1.0))
    losses.add_eval(["s3"], ser, torch.tensor(3.0))
    assert losses.split_orders() == {asr: ["a1", "a2"], ser: ["s1", "s2", "s3"]}
    assert {str(t): v for t, v in losses.means().items()} == {"asr:test-clean": 2.0, "ser:test": 2.0}
    out = {ser: R.split_collector(ser, classes)}   # ASR was not decoded on this rank: an empty collector joins
    out[ser].add_generated(["s1", "s2", "s3"], torch.tensor([0, 1, 1]), ["Anger", " Neutral", "happy"], ["p"] * 3)
    got = R.gather_by_split(losses, out, classes)
    assert list(got) == [asr, ser] and len(got[asr]) == 0 and got[ser]["pred"] == [0, 1, 2]  # 2 = invalid
    assert got[ser].summary() == {"UA": 75.0, "WA": 66.67, "invalid": 1}  # recalls 1 and 1/2
    out[ser] = R.split_collector(ser, classes)
    out[ser].add_generated(["s1", "s3"], torch.tensor([0, 1]), ["Anger", "Neutral"], ["p"] * 2)
    with pytest.raises(DataError, match=r"gathered ser:test outputs do not cover the 3 evaluated utterances once "
                                        r"each: missing 1: \['s2'\]"):
        R.gather_by_split(losses, out, classes)


def test_task_batches_come_from_the_shared_sampler_builder(msp_manifests):
    """HarmoniFuse's per-task batches = lobes.dataio.loader_kwargs with the task's size and the recipe seed: the
    batches the recipe drew before it used the shared builder (seeded shuffle, fixed or dynamic)."""
    from speechbrain.dataio.sampler import DynamicBatchSampler, ReproducibleRandomSampler
    from torch.utils.data import BatchSampler, SequentialSampler

    from lobes.dataio import ser_datasets

    classes = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
    ds = ser_datasets({"train": str(msp_manifests / "train.json")}, classes)["train"]
    h = {"dynamic_batching": False, "ser_batch_size": 3, "seed": 7, "num_workers": 0, "num_buckets": 2,
         "max_batch_ex": None, "max_batch_length_ser": 5.0}
    for train, order in ((True, ReproducibleRandomSampler(ds, seed=7)), (False, SequentialSampler(ds))):
        assert list(HD.task_batch_sampler(h, ds, "ser", train)) == list(BatchSampler(order, 3, drop_last=False))
    h["dynamic_batching"] = True
    for train in (True, False):
        ref = DynamicBatchSampler(ds, max_batch_length=5.0, num_buckets=2, length_func=lambda x: x["duration"],
                                  shuffle=train, batch_ordering="random" if train else "ascending", seed=7)
        assert list(HD.task_batch_sampler(h, ds, "ser", train)) == list(ref)
