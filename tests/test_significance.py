"""lobes.significance and tools.compare_rows: known answers, and brute-force enumeration on tiny cases."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lobes import significance as S
from lobes.errors import DataError
from lobes.metrics import confusion_counts, metrics_from_confusion, wer_details
from tools import compare_rows as CR

REPO = Path(__file__).resolve().parents[1]


def gap_systems():
    """500 utterances, 5 classes x 100: per class both right 45, only A 5, only B 15 -> UAR 0.50 vs 0.60."""
    t = np.repeat(np.arange(5), 100)
    a, b = np.empty(500, np.int64), np.empty(500, np.int64)
    for c in range(5):
        pa, pb = np.full(100, (c + 1) % 5), np.full(100, (c + 1) % 5)
        pa[:50], pb[:45], pb[50:65] = c, c, c
        a[c * 100:(c + 1) * 100], b[c * 100:(c + 1) * 100] = pa, pb
    return t, a, b


def test_batch_metrics_equal_lobes_metrics():
    rng = np.random.default_rng(3)
    t, p = rng.integers(0, 4, (20, 15)), rng.integers(0, 5, (20, 15))  # class 4 never true; some sets lack classes
    got = S.batch_ser_metrics(t, p, 6)
    for i in range(20):
        ref = metrics_from_confusion(confusion_counts(t[i], p[i], 6))
        for k in ("uar", "precision", "macro_f1"):
            assert got[k][i] == pytest.approx(ref[k], abs=1e-12)


def test_identical_systems():
    t, a, _ = gap_systems()
    res = S.compare_ser(t, a, a, 5, num_bootstraps=200, num_permutations=500)
    for m in ("uar", "macro_f1"):
        assert res[m]["delta"] == 0.0 and res[m]["ci"] == [0.0, 0.0] and res[m]["p"] == 1.0
    w = S.compare_wer([3, 5, 2], [1, 0, 2], [1, 0, 2], num_bootstraps=100, num_permutations=100)
    assert (w["delta"], w["ci"], w["p"]) == (0.0, [0.0, 0.0], 1.0)


def test_ten_point_uar_gap_on_500_utterances():
    t, a, b = gap_systems()
    res = S.compare_ser(t, a, b, 5)
    r = res["uar"]
    assert (r["a"], r["b"]) == (pytest.approx(0.5, abs=1e-12), pytest.approx(0.6, abs=1e-12))
    assert r["delta"] == pytest.approx(0.1, abs=1e-12) and r["n"] == 500
    assert r["p"] < 0.01
    assert 0 < r["ci"][0] < 0.1 < r["ci"][1]
    # 25 utterances favour A, 75 favour B: no random swap reaches Δ; two-sided Monte Carlo p = 2 (0 + 1) / (10^4 + 1)
    assert r["p"] == pytest.approx(2 / 10001)
    back = S.compare_ser(t, b, a, 5)["uar"]
    assert back["delta"] == pytest.approx(-0.1, abs=1e-12) and back["p"] == r["p"]


TINY_T = np.array([0, 0, 1, 1, 2, 2])
TINY_A = np.array([0, 1, 1, 0, 2, 0])
TINY_B = np.array([0, 0, 1, 2, 2, 2])


def _metric(name, t, p):
    return metrics_from_confusion(confusion_counts(t, p, 3))[name]


@pytest.mark.parametrize("name", ["uar", "macro_f1"])
def test_permutation_p_equals_enumeration_of_all_swaps(name):
    obs = _metric(name, TINY_T, TINY_B) - _metric(name, TINY_T, TINY_A)
    null = []
    for swap in itertools.product([False, True], repeat=6):
        s = np.array(swap)
        null.append(_metric(name, TINY_T, np.where(s, TINY_A, TINY_B))
                    - _metric(name, TINY_T, np.where(s, TINY_B, TINY_A)))
    exact = np.mean(np.abs(null) >= abs(obs) - 1e-12)  # two-sided, 2^6 = 64 equally likely swaps
    if name == "uar":
        # by hand: UAR 1/2 vs 5/6; only utterances 2 and 6 move a recall, each by ±1/6 -> |Δ| = 1/3 in 2 of 4 cases
        assert (obs, exact) == (pytest.approx(1 / 3, abs=1e-12), 0.5)
    res = S.compare_ser(TINY_T, TINY_A, TINY_B, 3, metrics=(name,), num_bootstraps=100)[name]
    assert res["delta"] == pytest.approx(obs, abs=1e-12) and res["p"] == pytest.approx(exact, abs=1e-12)


def test_bootstrap_ci_matches_enumeration_of_all_resamples():
    idx = np.array(list(itertools.product(range(6), repeat=6)))  # all 6^6 equally likely resampled sets
    exact = np.sort(S.batch_ser_metrics(TINY_T[idx], TINY_B[idx], 3)["uar"]
                    - S.batch_ser_metrics(TINY_T[idx], TINY_A[idx], 3)["uar"])

    def cdf(x):
        return np.searchsorted(exact, x + 1e-12, side="right") / len(exact)

    res = S.compare_ser(TINY_T, TINY_A, TINY_B, 3, metrics=("uar",), num_bootstraps=20000, num_permutations=100)
    low, high = res["uar"]["ci"]
    # each end sits where the exact distribution crosses 2.5% / 97.5% (Monte Carlo error of 20000 draws < 0.5%)
    assert cdf(low - 1e-9) <= 0.025 + 0.005 and cdf(low) >= 0.025 - 0.005
    assert cdf(high - 1e-9) <= 0.975 + 0.005 and cdf(high) >= 0.975 - 0.005
    assert low == 0.0 < high  # B is never worse than A on one utterance, so no resampled set favours A


def test_wer_sign_flip_equals_enumeration_and_pooled_wer():
    refs = ["a b c", "d e", "f g h i", "j", "k l m", "n o p q r", "s t", "u v w"]
    hyp_a = ["a b c", "d x", "f g h", "j", "k l", "n o p q r", "s", "u v w x"]
    hyp_b = ["a b", "d e", "f g h i", "y", "k l m", "n o q r", "s t", "u v w"]
    ea, words = S.utterance_errors(refs, hyp_a)
    eb, _ = S.utterance_errors(refs, hyp_b)
    res = S.compare_wer(words, ea, eb, num_bootstraps=100)
    assert res["a"] == pytest.approx(wer_details(refs, hyp_a)["wer"], abs=1e-12)
    assert res["delta"] == pytest.approx(wer_details(refs, hyp_b)["wer"] - wer_details(refs, hyp_a)["wer"], abs=1e-12)
    d = eb - ea
    null = [np.dot(signs, d) for signs in itertools.product([-1, 1], repeat=8)]
    exact = np.mean(np.abs(null) >= abs(d.sum()) - 1e-12)
    assert res["p"] == pytest.approx(exact, abs=1e-12)


def test_runs_are_paired_and_pooled():
    t, a, b = gap_systems()
    one = S.compare_ser(t, a, b, 5, num_bootstraps=100, num_permutations=100)["uar"]
    two = S.compare_ser(np.r_[t, t], np.r_[a, b], np.r_[b, b], 5, n_runs=2, num_bootstraps=100,
                        num_permutations=100)["uar"]
    # run 2 ties: the pooled Δ UAR is the mean of the runs' Δ (every run has the same class supports)
    assert two["delta"] == pytest.approx(one["delta"] / 2, abs=1e-12) and (two["n"], two["n_runs"]) == (500, 2)
    with pytest.raises(DataError, match="not 2 runs"):
        S.compare_ser(t[:-1], a[:-1], b[:-1], 5, n_runs=2)


def test_holm_against_hand_computed():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert S.holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    with pytest.raises(DataError):
        S.holm([0.2, float("nan")])


def test_t_interval():
    mean, low, high, std = S.t_interval([0.30, 0.35, 0.40])
    half = 0.95 / (2 * 0.975 * 0.025) ** 0.5 * 0.05 / 3 ** 0.5  # t_{0.975, 2} = (2u - 1) / sqrt(2u(1 - u))
    assert (mean, std) == (pytest.approx(0.35, abs=1e-15), pytest.approx(0.05, abs=1e-15))
    assert (low, high) == (pytest.approx(0.35 - half, abs=1e-12), pytest.approx(0.35 + half, abs=1e-12))
    assert S.t_interval([0.3]) == (0.3, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# tools.compare_rows
# ---------------------------------------------------------------------------------------------------------------
CLASSES = ["A", "B", "C", "D", "E"]


def write_ser(path, ids, t, p, extra=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["id,true,pred," + ",".join(CLASSES)]
    lines += [f"{i},{CLASSES[x]},{CLASSES[y]}," + ",".join(["0.2"] * 5) for i, x, y in zip(ids, t, p)]
    path.write_text("\n".join([*lines, *extra]) + "\n")


def test_compare_rows_folders_and_runs(tmp_path):
    t, a, b = gap_systems()
    ids = [f"u{i:03d}" for i in range(500)]
    write_ser(tmp_path / "A" / "predictions.csv", ids, t, a, extra=["only_a,A,A,0,0,0,0,0"])
    write_ser(tmp_path / "B" / "1986" / "predictions.csv", ids[::-1], t[::-1], b[::-1])  # order must not matter
    res = CR.compare_paths(tmp_path / "A", tmp_path / "B", num_bootstraps=200, num_permutations=999)["ser"]
    assert (res["n"], res["n_runs"], res["dropped"]) == (500, 1, [1, 0])
    assert res["metrics"]["uar"]["delta"] == pytest.approx(0.1, abs=1e-12)
    assert res["metrics"]["uar"]["p"] == pytest.approx(2 / 1000)
    # two seeds per side, paired by folder name; a seed only B has is left out
    for seed, (pa, pb) in {"1": (a, b), "2": (b, b)}.items():
        write_ser(tmp_path / "A2" / seed / "predictions.csv", ids, t, pa)
        write_ser(tmp_path / "B2" / seed / "predictions.csv", ids, t, pb)
    write_ser(tmp_path / "B2" / "3" / "predictions.csv", ids, t, a)
    res = CR.compare_paths(tmp_path / "A2", tmp_path / "B2", num_bootstraps=100, num_permutations=100)["ser"]
    assert res["n_runs"] == 2 and res["metrics"]["uar"]["delta"] == pytest.approx(0.05, abs=1e-12)


def test_compare_rows_bad_inputs(tmp_path):
    t, a, b = gap_systems()
    ids = [f"u{i}" for i in range(500)]
    write_ser(tmp_path / "A" / "predictions.csv", ids, t, a)
    write_ser(tmp_path / "B" / "predictions.csv", ids, (t + 1) % 5, b)
    with pytest.raises(DataError, match=r"utterance 'u0': reference 'A' in .*A/predictions.csv but 'B'"):
        CR.compare_paths(tmp_path / "A", tmp_path / "B")
    (tmp_path / "C").mkdir()
    with pytest.raises(DataError, match="no predictions file of the same kind"):
        CR.compare_paths(tmp_path / "A", tmp_path / "C")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\nx,1\n")
    with pytest.raises(DataError, match="bad.csv: expected columns"):
        CR.compare_paths(tmp_path / "A", bad)
    bad.write_bytes(b"id,true,pred\nx,caf\xe9,A\n")
    with pytest.raises(DataError, match=r"bad.csv:2: not UTF-8"):
        CR.compare_paths(tmp_path / "A", bad)


def test_compare_rows_cli_asr(tmp_path):
    rows = [("in", "u1", "a b c", "a b c", "a b"), ("in", "u2", "d e", "d x", "d e"), ("out", "v1", "f", "f", "g")]
    for side, col in (("A", 3), ("B", 4)):
        (tmp_path / side).mkdir()
        (tmp_path / side / "asr_predictions.csv").write_text(
            "split,id,ref,hyp\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[col]}\n" for r in rows))
    cmd = [sys.executable, "-m", "tools.compare_rows", str(tmp_path / "A"), str(tmp_path / "B"), "--split", "in",
           "--json", str(tmp_path / "cmp.json")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2] == "ASR: 2 utterances scored by both x 1 run(s) (left out: 0 only in A, 0 only in B)"
    # A: 1 error / 5 words = 20%; B: 1 deletion = 20%: Δ 0, so p = 1. Resampled sets: {u1, u1} gives Δ = +1/3,
    # {u2, u2} gives -1/2 (each with probability 1/4), so the 95% CI spans exactly these extremes
    assert out[4].split() == ["WER", "20.00", "20.00", "+0.00", "[-50.00,", "+33.33]", "1.0000"]
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["results"]["asr"]["metrics"]["wer"]["p"] == 1.0
    bad = subprocess.run(cmd[:5], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "choose one with --split" in bad.stderr


def test_iemocap_folds_use_the_shared_aggregation(load_recipe):
    avg = load_recipe("recipes/IEMOCAP/average_folds.py")
    assert avg.t_interval is S.t_interval  # folds and seeds: one Student-t code (values: test_t_interval)


def test_recipe_transcripts_give_delta_wer_and_the_enumerated_p_through_compare_rows(tmp_path):
    """The per-utterance transcripts a WER row writes (``write_asr_predictions``, as the MTL rows, the ASR-CTC
    recipes and tools.eval_asr do) compared by the CLI: ΔWER by hand, p = the enumeration of all 2^7 sign flips."""
    from lobes.collectors import ASRCollector, write_asr_predictions

    refs = ["A B C", "D E", "F G H I", "J", "K L M", "N O, P", "Q R"]
    hyps = {"source": ["A B C", "D X", "F G H", "J", "K L", "N O, P", "Q"],    # errors 0 1 1 0 1 0 1 = 4
            "mtl": ["A B", "D X Y", "F G H I", "Z", "K L M", "N P", "Q R S"]}  # errors 1 2 0 1 0 1 1 = 6
    folders = {"source": tmp_path / "sources" / "asr_in", "mtl": tmp_path / "rows" / "mtl_static_init" / "1986"}
    for name, folder in folders.items():
        asr = ASRCollector()
        asr.add(ids=[f"u{i}" for i in range(7)], refs=refs, hyps=hyps[name])
        write_asr_predictions(folder / "asr_predictions.csv", asr)
    # the comma survives the CSV round trip (quoted): the reference read back is the one written
    assert '"N O, P"' in (folders["mtl"] / "asr_predictions.csv").read_text().splitlines()[6]
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, "-m", "tools.compare_rows", str(folders["source"]), str(tmp_path / "rows" / "mtl_static_init"),
           "--num_permutations", "1000", "--num_bootstraps", "200", "--json", str(out)]
    printed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    r = json.loads(out.read_text())["results"]["asr"]["metrics"]["wer"]
    words = 3 + 2 + 4 + 1 + 3 + 3 + 2  # 18 reference words
    assert (r["a"], r["b"]) == (pytest.approx(4 / words, abs=1e-12), pytest.approx(6 / words, abs=1e-12))
    assert r["delta"] == pytest.approx(2 / words, abs=1e-12) and (r["n"], r["n_runs"]) == (7, 1)
    d = np.array([1, 2, 0, 1, 0, 1, 1]) - np.array([0, 1, 1, 0, 1, 0, 1])  # per-utterance e_B - e_A
    null = [np.dot(signs, d) for signs in itertools.product([-1, 1], repeat=7)]
    exact = np.mean(np.abs(null) >= abs(d.sum()) - 1e-12)  # |Σ ±d_i| >= 2: 88 of the 128 sign vectors
    assert exact == pytest.approx(88 / 128) and r["p"] == pytest.approx(exact, abs=1e-12)
    assert printed[4].split()[:4] == ["WER", "22.22", "33.33", "+11.11"]


def test_legend_says_why_a_row_was_not_tested():
    rows = [{"label": "W_ASR_in", "tested": False, "has_predictions": True},  # transcripts, but SER references only
            {"label": "old run", "tested": False, "has_predictions": False}, {"label": "S1", "tested": True}]
    text = CR.legend([], [("†", "S1")], rows).splitlines()
    assert text[-2:] == ["Not tested (no predictions file): old run.",
                         "Not tested (no reference row with predictions of the same kind): W_ASR_in."]
