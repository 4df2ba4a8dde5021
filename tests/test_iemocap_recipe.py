"""IEMOCAP recipe (recipes/IEMOCAP): a tiny 4-class SER run on fold 1 of the mini IEMOCAP (its metrics.json,
predictions.csv, confusion plot and inference use the recipe's own classes), the classes.txt check, and the
fold-averaging script on constructed metrics.json files (exact means, Student-t intervals, pooled UA / WA)."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lobes.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["neu", "hap", "ang", "sad"]
T_975_4 = 2.7764451051977934  # Student t, 97.5% quantile, 4 degrees of freedom (5 folds)


@pytest.fixture(scope="module")
def ser_fold1(mini_iemocap, iemocap_manifests, tmp_path_factory):
    from tools.make_tiny_wavlm import make_tiny_wavlm

    root = tmp_path_factory.mktemp("iemocap_ser")
    wavlm = make_tiny_wavlm(root / "tiny_wavlm")
    out = root / "ser" / "fold1"
    cmd = [sys.executable, str(ROOT / "recipes/IEMOCAP/ser/train.py"),
           str(ROOT / "recipes/IEMOCAP/ser/hparams/train_ser.yaml"),
           f"--data_folder={mini_iemocap.root}", f"--prep_folder={iemocap_manifests}", "--skip_prep=True",
           f"--wavlm_source={wavlm}", f"--output_folder={out}", "--fold=1", "--number_of_epochs=1",
           "--batch_size=16", "--head_hidden=16", "--num_bootstraps=20", "--device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def test_ser_fold1_metrics_and_predictions_use_the_four_classes(ser_fold1, iemocap_manifests):
    test = json.loads((iemocap_manifests / "fold1" / "test.json").read_text())
    m = json.loads((ser_fold1 / "metrics.json").read_text())
    assert m["experiment"] == "ser_finetune" and m["fold"] == 1
    t = m["test"]
    assert t["classes"] == FOUR and t["n"] == len(test) == 10
    # rows of the confusion matrix = the true classes of Session 1 (neu 3, hap 3, ang 2, sad 2), in FOUR order
    assert [sum(r) for r in t["confusion"]] == [3, 3, 2, 2] and len(t["confusion"][0]) == 4
    assert t["accuracy"] == pytest.approx(sum(t["confusion"][i][i] for i in range(4)) / 10)
    assert len(m["alphas"]) == 4 and sum(m["alphas"]) == pytest.approx(1.0, abs=1e-5)  # tiny WavLM: 4 layers

    rows = list(csv.reader(open(ser_fold1 / "predictions.csv")))
    assert rows[0] == ["id", "true", "pred"] + FOUR
    assert {r[0]: r[1] for r in rows[1:]} == {u: e["emo"] for u, e in test.items()}
    for r in rows[1:]:
        probs = [float(x) for x in r[3:]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and r[2] == FOUR[probs.index(max(probs))]
    assert (ser_fold1 / "confusion.png").stat().st_size > 1000
    assert (ser_fold1 / "finetuned_wavlm" / "model.safetensors").is_file()


def test_ser_fold1_inference_names_the_four_classes_and_matches_the_test_stage(ser_fold1, iemocap_manifests):
    from tools.infer import load_model

    test = json.loads((iemocap_manifests / "fold1" / "test.json").read_text())
    rec = load_model(ser_fold1)
    assert rec.classes == FOUR
    utt = sorted(test)[0]
    (res,) = rec.predict([test[utt]["wav"]], progress=False)
    assert list(res["probs"]) == FOUR
    row = next(r for r in csv.DictReader(open(ser_fold1 / "predictions.csv")) if r["id"] == utt)
    # the best checkpoint, reloaded: the same probabilities as the test stage wrote (up to batch padding)
    assert [res["probs"][c] for c in FOUR] == pytest.approx([float(row[c]) for c in FOUR], abs=1e-3)


def test_classes_txt_must_match_emotion_classes(load_recipe, iemocap_manifests):
    prep = load_recipe("recipes/IEMOCAP/iemocap_prepare.py")
    assert prep.check_classes(iemocap_manifests, FOUR) == FOUR
    with pytest.raises(DataError, match=r"classes.txt lists classes \['neu', 'hap', 'ang', 'sad'\] but "
                                        r"emotion_classes is \['neu', 'hap', 'sad', 'ang'\]"):
        prep.check_classes(iemocap_manifests, ["neu", "hap", "sad", "ang"])
    hp = {"prep_folder": str(iemocap_manifests), "fold": 3, "split_protocol": "sessions"}
    assert prep.iemocap_manifests(hp)["valid"] == str(iemocap_manifests / "fold3" / "valid.json")
    assert prep.iemocap_manifests(hp, asr=True)["test"] == str(iemocap_manifests / "fold3" / "asr_test.json")


# ------------------------------------------------------------------------------------------ fold averaging
def _confusion(correct, per_class):
    """4x4 confusion with ``per_class`` true utterances per class, ``correct[c]`` of them right (rest -> next)."""
    c = [[0] * 4 for _ in range(4)]
    for i in range(4):
        c[i][i] = correct[i]
        c[i][(i + 1) % 4] = per_class[i] - correct[i]
    return c


# fold k: per-class counts and how many of each are right
FOLDS = {
    1: ([10, 10, 10, 10], [5, 5, 5, 5]),    # UA 0.5,  WA 0.5
    2: ([10, 10, 10, 10], [6, 6, 6, 6]),    # UA 0.6,  WA 0.6
    3: ([10, 10, 10, 10], [7, 7, 7, 7]),    # UA 0.7,  WA 0.7
    4: ([10, 10, 10, 10], [8, 8, 8, 8]),    # UA 0.8,  WA 0.8
    5: ([20, 10, 10, 0], [20, 5, 5, 0]),    # UA (1 + .5 + .5) / 3 = 2/3 (sad absent), WA 30/40 = 0.75
}


def _write_fold(folder, exp, k, uar=None, acc=None, table_rows=None):
    per_class, correct = FOLDS[k]
    conf = _confusion(correct, per_class)
    n = sum(per_class)
    present = [i for i in range(4) if per_class[i]]
    uar = uar if uar is not None else sum(correct[i] / per_class[i] for i in present) / len(present)
    acc = acc if acc is not None else sum(correct) / n
    m = {"experiment": exp, "fold": k, "test": {"uar": uar, "accuracy": acc, "macro_f1": 0.1 * k, "confusion": conf,
                                                "n": n, "classes": FOUR}}
    if table_rows:
        m["table_rows"] = table_rows
    path = folder / exp / "1986" / f"fold{k}" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(m))
    return path


def test_average_folds_gives_exact_means_t_intervals_and_pooled_values(load_recipe, tmp_path):
    avg = load_recipe("recipes/IEMOCAP/average_folds.py")
    rows_dir = tmp_path / "rows"
    place = [{"part": "IEMOCAP", "row": "Setup 4: Proposed Dual-Vector", "order": 4}]
    for k in range(1, 6):
        _write_fold(rows_dir, "setup4_dual", k, table_rows=place)
        _write_fold(tmp_path / "ser", "ser_finetune", k)
    for k in (1, 2):
        _write_fold(rows_dir, "setup1_frozen", k, table_rows=[{"part": "IEMOCAP", "row": "Setup 1", "order": 1}])
    rows = avg.average_folds([tmp_path / "ser", rows_dir])
    assert [r["experiment"] for r in rows] == ["ser_finetune", "setup1_frozen", "setup4_dual"]
    r = rows[2]
    ua = [0.5, 0.6, 0.7, 0.8, 2 / 3]
    wa = [0.5, 0.6, 0.7, 0.8, 0.75]
    for key, vals in (("ua", ua), ("wa", wa)):
        mean = sum(vals) / 5
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)
        half = T_975_4 * std / math.sqrt(5)
        assert r[f"{key}_mean"] == pytest.approx(mean, abs=1e-12)
        assert r[f"{key}_std"] == pytest.approx(std, abs=1e-12)
        assert (r[f"{key}_ci_low"], r[f"{key}_ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-12)
        assert [r[f"{key}_fold{k}"] for k in range(1, 6)] == pytest.approx(vals)
    assert r["wa_mean"] == pytest.approx(0.67) and r["ua_mean"] == pytest.approx((2.6 + 2 / 3) / 5)
    # pooled: summed confusions; recalls neu 46/60, hap 31/50, ang 31/50, sad 26/40; WA 134/200
    assert r["ua_pooled"] == pytest.approx((46 / 60 + 31 / 50 + 31 / 50 + 26 / 40) / 4, abs=1e-12)
    assert r["wa_pooled"] == pytest.approx(134 / 200, abs=1e-12) and r["n"] == 200
    assert rows[1]["n_folds"] == 2 and rows[1]["ua_mean"] == pytest.approx(0.55)

    out = avg.write_tables(rows, tmp_path / "results" / "folds")
    md = (tmp_path / "results" / "folds.md").read_text()
    half_ua = 100 * (r["ua_ci_high"] - r["ua_mean"])
    assert f"| Setup 4: Proposed Dual-Vector | {100 * r['ua_mean']:.2f} ± {half_ua:.2f} | 67.00 ± " in md
    assert "| Setup 1 | 55.00 ± " in md and "1 2 (incomplete: 2/5)" in md
    table = list(csv.DictReader(open(out.with_name("folds.csv"))))
    assert float(table[2]["ua_fold5"]) == pytest.approx(2 / 3) and table[2]["n_folds"] == "5"


def test_average_folds_refuses_duplicate_folds_and_unnamed_runs(load_recipe, tmp_path):
    avg = load_recipe("recipes/IEMOCAP/average_folds.py")
    a = _write_fold(tmp_path / "a", "ser_finetune", 2)
    b = _write_fold(tmp_path / "b", "ser_finetune", 2)
    with pytest.raises(DataError, match=f"fold 2 twice, in {a} and {b}"):
        avg.average_folds([tmp_path / "a", tmp_path / "b"])
    bad = json.loads(a.read_text())
    bad["fold"] = 10  # leave-one-speaker-out has 10 folds
    a.write_text(json.dumps(bad))
    rows = avg.average_folds([a])
    assert rows[0]["folds"] == "10" and "ua_fold10" in avg.csv_text(rows, 10).splitlines()[0].split(",")
    assert avg.markdown(rows, 10).startswith("IEMOCAP, leave-one-speaker-out: ")
    bad["fold"] = 11
    a.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=f"{a}: 'fold' must be a fold 1..10, got 11"):
        avg.average_folds([a])
