"""Several seeds of one row: the seeds table of tools.collect_results (mean ± Student-t interval over runs beside the
pooled bootstrap CI), the λ figures as mean with a min–max band, every run.sh's --seeds option, and IEMOCAP's
fold table over seeds (per fold the mean of its seeds, then the Student-t interval over the folds)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lobes.errors import DataError
from lobes.metrics import ser_report
from tools import collect_results as CR
from tools import plot_coefficients as PC

T_975_2 = 4.30265272975  # Student-t 97.5% quantile, 2 degrees of freedom (3 seeds), from tables


def write_run(folder, label, uar, preds, classes=("A", "B")):
    """A run folder: metrics.json (one table row) and predictions.csv from ``preds`` = [(true, pred)]."""
    folder.mkdir(parents=True)
    folder.joinpath("metrics.json").write_text(json.dumps({
        "experiment": folder.name, "table_rows": [{"part": "Part 2", "row": label, "order": 1}],
        "test": {"uar": uar, "precision": 0.5, "macro_f1": 0.4, "uar_ci": [uar - 0.1, uar + 0.1]}}))
    lines = ["id,true,pred," + ",".join(classes)]
    lines += [f"u{i},{t},{p}," + ",".join(["0.5"] * len(classes)) for i, (t, p) in enumerate(preds)]
    folder.joinpath("predictions.csv").write_text("\n".join(lines) + "\n")


PERFECT = [("A", "A")] * 10 + [("B", "B")] * 10
HALF_B = [("A", "A")] * 10 + [("B", "B")] * 5 + [("B", "A")] * 5


def test_seed_table_mean_t_interval_and_pooled_values(tmp_path):
    rows_dir = tmp_path / "rows"
    for seed, uar, preds in (("1986", 0.5, PERFECT), ("1987", 0.6, HALF_B), ("1988", 0.7, PERFECT)):
        write_run(rows_dir / "setup4" / seed, "Setup 4", uar, preds)
    write_run(rows_dir / "setup1" / "1986", "Setup 1", 0.4, HALF_B)
    rows = CR.collect([rows_dir])
    (s1, s4) = sorted(CR.seed_rows(rows, num_bootstraps=200), key=lambda r: r["row"])
    # mean 0.6, sample sd 0.1: half-width t_{0.975,2} * 0.1 / sqrt(3)
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert s4["n_runs"] == 3 and s4["runs"] == "1986 1987 1988"
    assert s4["uar_mean"] == pytest.approx(0.6, abs=1e-12) and s4["uar_std"] == pytest.approx(0.1, abs=1e-12)
    assert (s4["uar_ci_low"], s4["uar_ci_high"]) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-10)
    assert s4["precision_ci_low"] == s4["precision_ci_high"] == pytest.approx(0.5)  # no spread
    # pooled over the 3 runs' 60 predictions: recall A 30/30, B 25/30 -> UAR 11/12; F1 by hand
    assert s4["uar_pooled"] == pytest.approx(11 / 12, abs=1e-12)
    f1_a, f1_b = 2 * 30 / (30 + 35), 2 * 25 / (30 + 25)
    assert s4["macro_f1_pooled"] == pytest.approx((f1_a + f1_b) / 2, abs=1e-12)
    # one run: a mean without an interval
    assert s1["n_runs"] == 1 and s1["uar_mean"] == 0.4 and s1["uar_ci_low"] is None
    md = CR.seed_markdown([s4, s1]).splitlines()
    assert md[3].startswith(f"| Setup 4 | 3 | 60.00 ± {100 * half:.2f} | 50.00 ± 0.00 | 40.00 ± 0.00 | - | 91.67 ± ")
    assert md[4].startswith("| Setup 1 | 1 | 40.00 | 50.00 | 40.00 | - | 75.00 ± ")
    # table.md names each run of a label with several runs; the single-run label stays as it was
    table = CR.markdown_table(rows).splitlines()
    assert [line.split(" | ")[0] for line in table[3:7]] == [
        "| Setup 1", "| Setup 4 (1986)", "| Setup 4 (1987)", "| Setup 4 (1988)"]


def test_pooled_ci_of_identical_runs_is_the_single_run_bootstrap_ci(tmp_path):
    # the utterance is the bootstrap condition: k copies of one run draw the same utterances as one run does
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, 60)
    p = np.where(rng.random(60) < 0.6, t, rng.integers(0, 3, 60))
    names = ["A", "B", "C"]
    for seed in ("1", "2", "3"):
        write_run(tmp_path / "rows" / "x" / seed, "X", 0.5, [(names[a], names[b]) for a, b in zip(t, p)], names)
    (row,) = CR.seed_rows(CR.collect([tmp_path / "rows"]), num_bootstraps=300)
    single = ser_report(t, p, num_bootstraps=300, n_classes=3)
    assert row["uar_pooled"] == pytest.approx(single["uar"], abs=1e-12)
    assert row["uar_pooled_ci"] == pytest.approx(single["uar_ci"], abs=1e-12)
    assert row["macro_f1_pooled_ci"] == pytest.approx(single["macro_f1_ci"], abs=1e-12)


def test_seed_table_cli_marks_and_missing_metric(tmp_path):
    rows_dir = tmp_path / "rows"
    for seed in ("1", "2"):
        write_run(rows_dir / "base" / seed, "Setup 1", 0.5, HALF_B * 10)
        write_run(rows_dir / "prop" / seed, "Setup 4", 0.9, PERFECT * 10)
    write_run(tmp_path / "src" / "ser", "SER source", 0.5, HALF_B * 10)  # one run: paired with every seed
    assert CR.main([str(rows_dir), str(tmp_path / "src"), "--out", str(tmp_path / "t"), "--seeds_table", str(tmp_path / "s"),
                    "--significance", str(tmp_path / "sig"), "--mark", "†=Setup 1", "--num_permutations", "999",
                    "--num_bootstraps", "100"]) == 0
    md = (tmp_path / "s.md").read_text(encoding="utf-8").splitlines()
    # the paired test pairs the seeds: 400 units, Setup 4 far better -> marked on its pooled cells only
    assert md[3].startswith("| SER source | 1 | 50.00 | 50.00 | 40.00 | - | 75.00 ± ") and "†" not in md[3]
    assert md[4].startswith("| Setup 1 | 2 | 50.00 ± 0.00 |") and "†" not in md[4]
    assert md[5].startswith("| Setup 4 | 2 | 90.00 ± 0.00 |") and md[5].count("†") == 2
    assert md[5].split(" | ")[6:8] == ["100.00 ± 0.00†", "100.00 ± 0.00†"]
    assert "Mean over the runs (1, 2) ±" in md[7] and "s.csv" in md[7]
    sig = (tmp_path / "sig.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[2] for line in sig[1:]] == ["SER source", "SER source", "Setup 4", "Setup 4"]
    assert [line.split(",")[-3] for line in sig[1:3]] == ["2", "2"]  # n_runs: the source beside both seeds
    # a metric present in some runs of a row but not all is an error naming the row
    data = json.loads((rows_dir / "prop" / "2" / "metrics.json").read_text())
    del data["test"]["precision"]
    (rows_dir / "prop" / "2" / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="row 'Setup 4': precision in only 1 of its 2 runs"):
        CR.seed_rows(CR.collect([rows_dir]))


def test_lambda_figure_of_several_seeds_is_their_mean_with_a_min_max_band(tmp_path):
    rows = tmp_path / "rows"
    lam = {"1986": 0.2, "1987": 0.5, "1988": 0.8}
    for role in ("setup4_dual", "out_of_domain_dual"):
        for seed, v in lam.items():
            (rows / role / seed).mkdir(parents=True)
            (rows / role / seed / "coefficients.json").write_text(json.dumps(
                {"lambda": {"ASR": [v, v + 0.1, v], "SER": [1 - v, 0.5, 0.5]}}))
    runs = {role: [rows / role / s for s in lam] for role in ("in_domain", "out_of_domain")}
    runs["in_domain"] = [rows / "setup4_dual" / s for s in lam]
    runs["out_of_domain"] = [rows / "out_of_domain_dual" / s for s in lam]
    path, plotted, missing = PC.paper_figure("figure3", runs, tmp_path / "plots")
    assert path.name == "figure3_lambda_domain.png" and missing == []
    assert plotted["In-domain λ_ASR"] == pytest.approx([0.5, 0.6, 0.5], abs=1e-12)
    assert plotted["In-domain λ_ASR band"][0] == pytest.approx([0.2, 0.3, 0.2], abs=1e-12)
    assert plotted["In-domain λ_ASR band"][1] == pytest.approx([0.8, 0.9, 0.8], abs=1e-12)
    assert plotted["In-domain λ_SER band"] == pytest.approx(np.array([[0.2, 0.5, 0.5], [0.8, 0.5, 0.5]]), abs=1e-12)
    # the CLI as stage 4 calls it with several seeds: row folders + --seeds
    out = tmp_path / "cli"
    assert PC.main(["--out", str(out), "--seeds", "1986", "1987", "1988", "--figure3", str(rows / "setup4_dual"),
                    str(rows / "out_of_domain_dual")]) == 0
    assert (out / "figure3_lambda_domain.png").is_file()
    # a row with some of the seeds only: an error, not a band over fewer runs
    with pytest.raises(DataError, match=r"runs missing: \[.*setup4_dual/1999'\]"):
        PC.paper_figure("figure3", {"in_domain": [rows / "setup4_dual" / "1986", rows / "setup4_dual" / "1999"]},
                        tmp_path / "plots")


# ----------------------------------------------------------------------------------------------------------------
# IEMOCAP: one fold table over the seeds (recipes/IEMOCAP/average_folds.py, run.sh stage 4)
# ----------------------------------------------------------------------------------------------------------------
T_975_4 = 2.7764451051977934  # Student-t 97.5% quantile, 4 degrees of freedom (5 folds)
# (fold, seed) -> right answers of 10 per class (2 classes): UA = WA = x / 10; fold 5 has seed 1986 only
RIGHT = {(1, 1986): 5, (1, 7): 7, (2, 1986): 6, (2, 7): 6, (3, 1986): 7, (3, 7): 5, (4, 1986): 8, (4, 7): 6,
         (5, 1986): 9}


def write_fold_run(exp_dir, experiment, fold, seed, right, record_seed=True):
    """rows/<experiment>/<seed>/fold<k>/metrics.json of one run; ``record_seed=False``: the seed only in the
    hyperparams.yaml beside it (an older run)."""
    folder = exp_dir / "rows" / experiment / str(seed) / f"fold{fold}"
    folder.mkdir(parents=True)
    m = {"experiment": experiment, "fold": fold, "table_rows": [{"part": "IEMOCAP", "row": "Setup 4", "order": 4}],
         "test": {"uar": right / 10, "accuracy": right / 10, "confusion": [[right, 10 - right], [10 - right, right]]}}
    if record_seed:
        m["seed"] = seed
    else:
        (folder / "hyperparams.yaml").write_text(f"# Generated\nexperiment: {experiment}\nseed: {seed}  # the run's\n")
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder / "metrics.json"


def test_iemocap_fold_table_averages_the_seeds_of_each_fold_then_the_folds(load_recipe, tmp_path):
    avg = load_recipe("recipes/IEMOCAP/average_folds.py")
    for (fold, seed), right in RIGHT.items():
        write_fold_run(tmp_path, "setup4_dual", fold, seed, right, record_seed=(fold, seed) != (4, 7))
    (row,) = avg.average_folds([tmp_path / "rows"])
    folds = [0.6, 0.6, 0.6, 0.7, 0.9]  # per fold: the mean of its seeds (fold 5: its one seed)
    mean = sum(folds) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in folds) / 4)
    half = T_975_4 * std / math.sqrt(5)  # n = 5 folds, not the 9 runs
    assert [row[f"ua_fold{k}"] for k in range(1, 6)] == pytest.approx(folds, abs=1e-12)
    assert (row["ua_mean"], row["ua_std"]) == (pytest.approx(0.68, abs=1e-12), pytest.approx(std, abs=1e-12))
    assert (row["ua_ci_low"], row["ua_ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-12)
    # pooled: each fold's confusion averaged over its seeds, then summed: [[34, 16], [16, 34]], 100 utterances
    assert (row["ua_pooled"], row["wa_pooled"], row["n"]) == (pytest.approx(0.68), pytest.approx(0.68), 100)
    assert (row["seeds"], row["seeds_per_fold"], row["n_folds"]) == ("7 1986", "2 2 2 2 1", 5)
    assert row["per_seed"]["ua"]["4"] == {"7": 0.6, "1986": 0.8}  # seed 7 of fold 4: from its hyperparams.yaml
    md = avg.markdown([row])
    assert f"| Setup 4 | 68.00 ± {100 * half:.2f} | 68.00 ± {100 * half:.2f} | - | - | 68.00 | 68.00 | 1 2 3 4 5 | " \
           "7 1986 (per fold: 2 2 2 2 1) |" in md

    # the same fold and seed twice, or a second run that records no seed: errors naming both files
    first = tmp_path / "rows" / "setup4_dual" / "7" / "fold2" / "metrics.json"
    again = write_fold_run(tmp_path / "copy", "setup4_dual", 2, 7, 3)
    with pytest.raises(DataError, match=f"fold 2 twice, in {first} and {again} \\(seed 7\\)"):
        avg.average_folds([tmp_path / "rows", again])
    bare = tmp_path / "bare" / "metrics.json"
    bare.parent.mkdir()
    bare.write_text(json.dumps({"experiment": "setup4_dual", "fold": 5, "test": {"uar": 0.5}}))
    with pytest.raises(DataError, match="fold 5 twice, .* without a recorded seed"):
        avg.average_folds([tmp_path / "rows", bare])


def test_iemocap_run_sh_stage4_writes_one_table_over_the_seeds(tmp_path):
    root = Path(__file__).resolve().parents[1]
    exp = tmp_path / "exp"
    for (fold, seed), right in RIGHT.items():
        write_fold_run(exp, "setup4_dual", fold, seed, right)
    write_fold_run(exp, "setup4_dual", 1, 99, 0)  # a seed not asked for: left out
    proc = subprocess.run(["bash", "recipes/IEMOCAP/run.sh", "--stage", "4", "--data_folder", "d", "--exp", str(exp),
                           "--seeds", "1986 7"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    md = (exp / "results" / "folds.md").read_text()
    assert "| Setup 4 | 68.00 ± " in md and "| 1 2 3 4 5 | 7 1986 (per fold: 2 2 2 2 1) |" in md
    assert sorted(p.name for p in (exp / "results").iterdir()) == ["folds.csv", "folds.json", "folds.md"]
