"""SER metrics, bootstrap CIs, WER and metrics.json writing, checked against hand-computed fractions."""
import json

import numpy as np
import pytest

from lobes import metrics as M
from lobes.errors import DataError


def from_confusion(conf):
    """y_true / y_pred realising the confusion matrix ``conf`` (rows = true class)."""
    t, p = [], []
    for i, row in enumerate(conf):
        for j, count in enumerate(row):
            t += [i] * count
            p += [j] * count
    return t, p


# 3 classes, all predicted at least once.
CONF3 = [[3, 1, 0],
         [2, 2, 0],
         [0, 1, 1]]


def test_ser_metrics_hand_computed_3_class():
    t, p = from_confusion(CONF3)
    m = M.ser_metrics(t, p, n_classes=3)
    # recall = tp / row sum: 3/4, 2/4, 1/2
    assert m["uar"] == pytest.approx((3 / 4 + 2 / 4 + 1 / 2) / 3)
    # precision = tp / column sum (5, 4, 1): 3/5, 2/4, 1/1
    assert m["precision"] == pytest.approx((3 / 5 + 2 / 4 + 1 / 1) / 3)
    # F1 = 2 tp / (row + col): 6/9, 4/8, 2/3
    assert m["macro_f1"] == pytest.approx((6 / 9 + 4 / 8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["per_class_recall"] == pytest.approx([3 / 4, 2 / 4, 1 / 2])
    assert m["confusion"] == CONF3
    assert m["n"] == 10


def test_ser_metrics_class_never_predicted_and_class_never_true():
    # 8 classes; classes 0,1,2 occur; class 2 is never predicted; class 5 is predicted once but never occurs.
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 5, 0, 1, 1]
    m = M.ser_metrics(t, p, n_classes=8)
    # UAR over the classes present in y_true only: recalls 2/3, 1/2, 0.
    assert m["uar"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # precision over U = {0, 1, 2, 5}: 2/3 (col 0 has 3), 1/2 (col 1 has 2), 0 (never predicted), 0 (no tp).
    assert m["precision"] == pytest.approx((2 / 3 + 1 / 2 + 0 + 0) / 4)
    # F1 = 2tp/(row+col): class 0: 4/6, class 1: 2/4, classes 2 and 5: 0.
    assert m["macro_f1"] == pytest.approx((4 / 6 + 2 / 4) / 4)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class_recall"][:3] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert m["per_class_recall"][3:] == [None] * 5
    assert m["confusion"][0][5] == 1 and m["confusion"][2][1] == 1
    assert np.asarray(m["confusion"]).shape == (8, 8) and np.asarray(m["confusion"]).sum() == 6


def test_confusion_formulas_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 60))
        t = rng.integers(0, 8, n)
        p = np.where(rng.random(n) < 0.4, t, rng.integers(0, 5, n))  # classes 5-7 never predicted
        ref = M.ser_metrics(t, p)
        fast = M.metrics_from_confusion(M.confusion_counts(t, p, 8))
        for k in ("uar", "precision", "macro_f1", "accuracy"):
            assert fast[k] == pytest.approx(ref[k], abs=1e-12), (trial, k)


@pytest.mark.parametrize("t,p,msg", [
    ([0, 1], [0], "y_pred has 1"),
    ([], [], "empty"),
    ([0, 8], [0, 1], "y_true[1] = 8"),
    ([0, 1], [0, -1], "y_pred[1] = -1"),
    ([0, 1.5], [0, 1], "integers"),
])
def test_ser_metrics_bad_input(t, p, msg):
    with pytest.raises(DataError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        M.ser_metrics(t, p)


def noisy_predictions(n, seed, acc=0.5, n_classes=4):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n_classes, n)
    p = np.where(rng.random(n) < acc, t, rng.integers(0, n_classes, n))
    return t, p


def test_bootstrap_seed0_is_the_package_evaluate_with_conf_int():
    ci_pkg = pytest.importorskip("confidence_intervals")
    t, p = noisy_predictions(120, 1)
    spk = np.arange(120) % 7
    for cond in (None, spk):
        ours = M.bootstrap_ci(t, p, M.uar_fn(4), num_bootstraps=50, conditions=cond, seed=0)
        theirs = ci_pkg.evaluate_with_conf_int(p, M.uar_fn(4), labels=t, conditions=cond, num_bootstraps=50)
        assert ours[0] == theirs[0]
        assert ours[1] == (float(theirs[1][0]), float(theirs[1][1]))


def test_fast_speaker_resampling_is_bit_identical_to_the_package():
    ci_pkg = pytest.importorskip("confidence_intervals")
    rng = np.random.default_rng(3)
    cond = rng.integers(0, 25, 400)  # uneven speaker sizes
    groups = M._ConditionGroups(cond)
    for rs in (0, 1, 17, 999, 123456):
        expected = ci_pkg.get_bootstrap_indices(400, cond, random_state=rs)
        np.testing.assert_array_equal(M._condition_indices(groups, rs), expected)


def test_bootstrap_without_package_gives_the_same_numbers(monkeypatch):
    t, p = noisy_predictions(150, 2)
    spk = [f"s{i % 9}" for i in range(150)]
    with_pkg = M.ser_report(t, p, speakers=spk, num_bootstraps=40, n_classes=4)
    plain = M.bootstrap_ci(t, p, M.macro_f1_fn(4), num_bootstraps=40, seed=3)
    monkeypatch.setattr(M, "_ci_bootstrap_indices", None)
    monkeypatch.setattr(M, "_ci_conf_int", None)
    assert M.ser_report(t, p, speakers=spk, num_bootstraps=40, n_classes=4) == with_pkg
    assert M.bootstrap_ci(t, p, M.macro_f1_fn(4), num_bootstraps=40, seed=3) == plain


def test_ci_contains_point_and_narrows_with_more_samples():
    t, p = noisy_predictions(200, 4)
    value, (low, high) = M.bootstrap_ci(t, p, M.uar_fn(4), num_bootstraps=200)
    assert value == pytest.approx(M.ser_metrics(t, p, 4)["uar"])
    assert low < value < high
    # Ten copies of the same predictions: same UAR, a CI about sqrt(10) times narrower.
    value10, (low10, high10) = M.bootstrap_ci(np.tile(t, 10), np.tile(p, 10), M.uar_fn(4), num_bootstraps=200)
    assert value10 == pytest.approx(value)
    assert low10 < value10 < high10
    assert (high10 - low10) < 0.5 * (high - low)


def test_bootstrap_deterministic_per_seed():
    t, p = noisy_predictions(100, 5)
    a = M.bootstrap_ci(t, p, M.precision_fn(4), num_bootstraps=60, seed=7)
    b = M.bootstrap_ci(t, p, M.precision_fn(4), num_bootstraps=60, seed=7)
    c = M.bootstrap_ci(t, p, M.precision_fn(4), num_bootstraps=60, seed=8)
    assert a == b
    assert a[0] == c[0] and a[1] != c[1]


def test_ser_report_matches_per_metric_bootstrap_and_keys():
    t, p = noisy_predictions(180, 6)
    spk = [f"spk{i % 12}" for i in range(180)]
    rep = M.ser_report(t, p, speakers=spk, num_bootstraps=80, n_classes=4, seed=2)
    for name, fn in (("uar", M.uar_fn(4)), ("precision", M.precision_fn(4)), ("macro_f1", M.macro_f1_fn(4))):
        value, ci = M.bootstrap_ci(t, p, fn, num_bootstraps=80, conditions=spk, seed=2)
        assert rep[name] == pytest.approx(value)
        assert rep[f"{name}_ci"] == list(ci)
    assert rep["n"] == 180 and rep["ci_unit"] == "speaker" and rep["ci_level"] == 0.95
    json.dumps(rep)  # JSON-serialisable as is


def test_speaker_bootstrap_wider_when_errors_cluster_by_speaker():
    # 20 speakers x 20 utterances; odd speakers are always right, even speakers always wrong (binary task).
    spk = np.repeat(np.arange(20), 20)
    t = np.zeros(400, dtype=int)
    p = np.where(spk % 2 == 1, 0, 1)
    _, (lo_u, hi_u) = M.bootstrap_ci(t, p, lambda a, b: float(np.mean(a == b)), num_bootstraps=200)
    _, (lo_s, hi_s) = M.bootstrap_ci(t, p, lambda a, b: float(np.mean(a == b)), num_bootstraps=200, conditions=spk)
    assert (hi_s - lo_s) > 2 * (hi_u - lo_u)


def test_speaker_conditions_unknown_speakers_are_singletons():
    cond = M.speaker_conditions(["b", "a", "Unknown", "b", None, "unknown", ""])
    assert cond.tolist() == [1, 0, 2, 1, 3, 4, 5]


def test_bootstrap_bad_input():
    with pytest.raises(DataError, match="conditions has 2"):
        M.bootstrap_ci([0, 1, 1], [0, 1, 0], M.uar_fn(2), num_bootstraps=5, conditions=["a", "b"])
    with pytest.raises(DataError, match="alpha"):
        M.bootstrap_ci([0, 1], [0, 1], M.uar_fn(2), num_bootstraps=5, alpha=0)
    with pytest.raises(DataError, match="empty"):
        M.bootstrap_ci([], [], M.uar_fn(2), num_bootstraps=5)


def test_wer_one_substitution_one_deletion():
    assert M.wer(["the cat sat on the mat"], ["the bat sat on mat"]) == pytest.approx(2 / 6)


def test_wer_pools_errors_over_the_corpus():
    d = M.wer_details(["a b c d", "e f", ""], ["a b c d", "x", "y"])
    # utterance 2: e->x substitution, f deleted; utterance 3: y inserted. 3 errors / 6 reference words
    # (a mean of per-utterance WERs would be different).
    assert d == {"wer": pytest.approx(3 / 6), "substitutions": 1, "deletions": 1, "insertions": 1,
                 "hits": 4, "n_ref_words": 6, "n_utts": 3}


@pytest.mark.parametrize("refs,hyps,msg", [
    ([], [], "empty"),
    (["a b"], ["a", "b"], "refs has 1"),
    ([""], ["x"], "no words"),
    ("a b", "a b", "lists"),
    (["a", None], ["a", "b"], r"refs\[1\]"),
])
def test_wer_bad_input(refs, hyps, msg):
    with pytest.raises(DataError, match=msg):
        M.wer(refs, hyps)


def test_write_metrics_roundtrip_atomic(tmp_path):
    path = tmp_path / "exp" / "metrics.json"
    rep = M.ser_report([0, 1, 1, 2], [0, 1, 0, 2], n_classes=3, num_bootstraps=10)
    data = {"experiment": "dual", "test": rep, "wer": np.float32(0.25), "alphas": np.array([0.5, 0.5]),
            "lambdas": {"ASR": [0.5] * 3}}
    M.write_metrics(path, data)
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
    back = M.read_metrics(path)
    assert back["test"]["uar"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert back["test"]["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert back["wer"] == pytest.approx(0.25) and back["alphas"] == [0.5, 0.5]
    with pytest.raises(DataError, match=r"metrics.wer"):
        M.write_metrics(path, {"wer": float("nan")})
    assert M.read_metrics(path)["experiment"] == "dual"  # failed write left the old file intact


def test_read_metrics_errors(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="metrics.json: not valid JSON"):
        M.read_metrics(bad)
    with pytest.raises(DataError, match="not found"):
        M.read_metrics(tmp_path / "missing.json")


def test_wer_ci_is_the_percentile_interval_of_pooled_wers_over_the_ser_bootstrap_sets():
    refs = ["A B C D", "E F", "G H I", "", "J K L M N"]
    hyps = ["A B X D", "E", "G H I J", "K", "J K L M N"]
    errors, words = np.array([1, 1, 1, 1, 0.0]), np.array([4, 2, 3, 0, 5.0])  # 1 sub, 1 del, 1 ins, 1 ins
    wer, (lo, hi) = M.wer_ci(refs, hyps, num_bootstraps=300, seed=3)
    assert wer == pytest.approx(4 / 14) == pytest.approx(M.wer(refs, hyps))
    vals = [errors[i].sum() / words[i].sum() for i in M.bootstrap_sets(5, None, 300, 3) if words[i].sum() > 0]
    assert [lo, hi] == pytest.approx([np.percentile(vals, 2.5), np.percentile(vals, 97.5)], abs=1e-12)
    assert 0.0 <= lo < wer < hi
    # speaker-level: every draw keeps or drops whole speakers
    spk_lo, spk_hi = M.wer_ci(refs, hyps, num_bootstraps=300, conditions=["s1", "s1", "s2", "s2", "s3"])[1]
    assert (spk_lo, spk_hi) != (lo, hi)
    assert M.wer_ci(["A B"], ["A B"], num_bootstraps=20) == (0.0, [0.0, 0.0])
