"""tools.collect_results on hand-written metrics.json files: exact markdown rows and CSV values."""
import csv
import json

import pytest

from lobes.errors import DataError
from tools import collect_results as CR


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def ser(uar, uar_ci, pre, pre_ci, f1, f1_ci, n=100):
    return {"uar": uar, "uar_ci": uar_ci, "precision": pre, "precision_ci": pre_ci,
            "macro_f1": f1, "macro_f1_ci": f1_ci, "accuracy": 0.5, "n": n}


@pytest.fixture
def exps(tmp_path):
    root = tmp_path / "exp"
    # Written in an order that differs from the table order on purpose.
    write(root / "dual" / "1986" / "metrics.json", {
        "experiment": "adaltm_dual", "part": "Part 2: Ablation", "row": "Setup 4: Proposed Dual-Vector", "order": 4,
        "test": ser(0.3894, [0.3833, 0.3955], 0.3426, [0.3384, 0.3468], 0.3520, [0.3472, 0.3568])})
    write(root / "baseline" / "metrics.json", {
        "experiment": "frozen", "table_order": {"part": "Part 2: Ablation", "row": "Setup 1: Baseline", "order": 1},
        "test": ser(0.3705, [0.3638, 0.3772], 0.3446, [0.3404, 0.3488], 0.3446, [0.3399, 0.3493])})
    write(root / "zzz_extra" / "metrics.json", {  # same part, no order: after the ordered rows
        "experiment": "extra", "part": "Part 2: Ablation", "test": {"uar": 0.4, "precision": 0.3, "macro_f1": 0.2}})
    write(root / "asr_in" / "metrics.json", {"experiment": "asr_in", "part": "Part 10: ASR", "wer": 0.2309,
                                                "wer_ci": [0.2250, 0.2372]})
    write(root / "mtl" / "metrics.json", {  # no part: first, under no heading
        "experiment": "MTL w/ static init.",
        "test": ser(0.2921, [0.2883, 0.2959], 0.3830, [0.3584, 0.4076], 0.2906, [0.2856, 0.2956]), "wer": 0.6637})
    return root


EXPECTED_MD = """\
| Method/Setup | UAR | Pre. | MaF1 | WER |
|---|:---:|:---:|:---:|:---:|
| MTL w/ static init. | 29.21 ± 0.38 | 38.30 ± 2.46 | 29.06 ± 0.50 | 66.37 |
| **Part 2: Ablation** | | | | |
| Setup 1: Baseline | 37.05 ± 0.67 | 34.46 ± 0.42 | 34.46 ± 0.47 | - |
| Setup 4: Proposed Dual-Vector | 38.94 ± 0.61 | 34.26 ± 0.42 | 35.20 ± 0.48 | - |
| extra | 40.00 | 30.00 | 20.00 | - |
| **Part 10: ASR** | | | | |
| asr_in | - | - | - | 23.09 ± 0.61 |
"""


def test_collect_and_write_table(exps, tmp_path):
    rows = CR.collect([exps])
    assert [r["label"] for r in rows] == [
        "MTL w/ static init.", "Setup 1: Baseline", "Setup 4: Proposed Dual-Vector", "extra", "asr_in"]
    md, csv_path = CR.write_table(rows, tmp_path / "results" / "table")
    assert md.name == "table.md" and csv_path.name == "table.csv"
    assert md.read_text() == EXPECTED_MD
    assert sorted(p.name for p in md.parent.iterdir()) == ["table.csv", "table.md"]  # no temp files left

    with open(csv_path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == list(CR.CSV_COLUMNS)
    assert [g["experiment"] for g in got] == ["MTL w/ static init.", "frozen", "adaltm_dual", "extra", "asr_in"]
    dual = got[2]
    assert dual["part"] == "Part 2: Ablation" and float(dual["order"]) == 4
    assert float(dual["uar"]) == 0.3894
    assert (float(dual["uar_ci_low"]), float(dual["uar_ci_high"])) == (0.3833, 0.3955)
    assert (float(dual["macro_f1_ci_low"]), float(dual["macro_f1_ci_high"])) == (0.3472, 0.3568)
    assert float(dual["accuracy"]) == 0.5 and dual["n"] == "100" and dual["wer"] == ""
    assert got[0]["wer"] == "0.6637" and got[0]["part"] == ""
    asr = got[4]
    assert asr["wer"] == "0.2309" and asr["uar"] == "" and asr["uar_ci_low"] == ""
    assert (float(asr["wer_ci_low"]), float(asr["wer_ci_high"])) == (0.2250, 0.2372) and got[0]["wer_ci_low"] == ""


def test_files_and_folders_mixed_without_duplicates(exps):
    rows = CR.collect([exps / "dual", exps / "dual" / "1986" / "metrics.json", exps / "mtl"])
    assert [r["experiment"] for r in rows] == ["MTL w/ static init.", "adaltm_dual"]


def test_cli_writes_table(exps, tmp_path, capsys):
    rc = CR.main([str(exps / "baseline"), str(exps / "dual"), "--out", str(tmp_path / "t.md")])
    assert rc == 0
    text = (tmp_path / "t.md").read_text()
    assert text.splitlines()[3:] == ["| Setup 1: Baseline | 37.05 ± 0.67 | 34.46 ± 0.42 | 34.46 ± 0.47 | - |",
                                     "| Setup 4: Proposed Dual-Vector | 38.94 ± 0.61 | 34.26 ± 0.42 | 35.20 ± 0.48 | - |"]
    assert (tmp_path / "t.csv").exists()
    assert capsys.readouterr().out == text


def test_one_experiment_in_several_rows(tmp_path, capsys):
    write(tmp_path / "dual" / "metrics.json", {
        "experiment": "dual", "test": {"uar": 0.3894, "precision": 0.3426, "macro_f1": 0.352},
        "table_rows": [{"part": "Part 4: Granularity", "row": "Adaptive Layer-wise Merging (Ours)", "order": 3},
                       {"part": "Part 2: Ablation", "row": "Setup 4: Proposed Dual-Vector", "order": 4}]})
    assert CR.markdown_table(CR.collect([tmp_path])).splitlines()[2:] == [
        "| **Part 2: Ablation** | | | | |",
        "| Setup 4: Proposed Dual-Vector | 38.94 | 34.26 | 35.20 | - |",
        "| **Part 4: Granularity** | | | | |",
        "| Adaptive Layer-wise Merging (Ours) | 38.94 | 34.26 | 35.20 | - |",
    ]
    write(tmp_path / "dual" / "metrics.json", {"test": {"uar": 0.3}, "table_rows": {"part": "x"}})
    with pytest.raises(DataError, match="'table_rows' must be"):
        CR.collect([tmp_path])
    # table_rows: [] keeps a run out of the table (rows beyond the paper, e.g. setup4_dual_lowrank), named on stderr
    write(tmp_path / "lowrank" / "metrics.json", {"test": {"uar": 0.3}, "table_rows": []})
    write(tmp_path / "dual" / "metrics.json", {"test": {"uar": 0.5}, "row": "Setup 4"})
    assert [r["label"] for r in CR.collect([tmp_path])] == ["Setup 4"]
    assert "lowrank/metrics.json has table_rows: [] (not a table row), left out" in capsys.readouterr().err


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no metrics.json"):
        CR.collect([tmp_path / "empty"])
    with pytest.raises(DataError, match="no such file"):
        CR.collect([tmp_path / "nope"])
    bad = tmp_path / "bad" / "metrics.json"
    write(bad, {"test": {"uar": 0.3, "uar_ci": [0.4, 0.2]}})
    with pytest.raises(DataError, match=r"bad/metrics.json: test.uar_ci: low 0.4 > high 0.2"):
        CR.collect([bad])
    write(bad, {"experiment": "x"})
    with pytest.raises(DataError, match="neither"):
        CR.collect([bad])
    write(bad, {"test": {"uar": "high"}})
    with pytest.raises(DataError, match="test.uar"):
        CR.collect([bad])
    assert CR.main([str(bad), "--out", str(tmp_path / "t")]) == 2


def test_source_models_as_reference_rows(exps, tmp_path, capsys):
    # the SER recipe's metrics.json (its own placement is ignored) and two tools.eval_asr outputs
    write(tmp_path / "ser" / "metrics.json", {"experiment": "1986", "table_rows": [{"part": "x", "row": "y"}],
                                              "test": ser(0.39, [0.38, 0.40], 0.35, [0.34, 0.36], 0.3556,
                                                          [0.3506, 0.3606])})
    write(tmp_path / "asr_in" / "metrics.json", {"experiment": "asr_in", "wer": 0.2309, "n": 46366})
    write(tmp_path / "asr_out" / "metrics.json", {"experiment": "asr_out", "wer": 0.3786, "n": 46366})
    sources = [CR.parse_source(f"SER source (W_SER)={tmp_path / 'ser' / 'metrics.json'}"),
               CR.parse_source(f"In-domain ASR source (W_ASR_in) = {tmp_path / 'asr_in' / 'metrics.json'}"),
               CR.parse_source(f"Out-of-domain ASR source (W_ASR_out)={tmp_path / 'asr_out' / 'metrics.json'}")]
    rows = CR.collect([exps / "dual"], sources)
    assert [(r["part"], r["label"]) for r in rows] == [
        (CR.SOURCE_PART, "SER source (W_SER)"), (CR.SOURCE_PART, "In-domain ASR source (W_ASR_in)"),
        (CR.SOURCE_PART, "Out-of-domain ASR source (W_ASR_out)"), ("Part 2: Ablation", "Setup 4: Proposed Dual-Vector")]
    md = CR.markdown_table(rows).splitlines()
    assert md[2:6] == [f"| **{CR.SOURCE_PART}** | | | | |",
                       "| SER source (W_SER) | 39.00 ± 1.00 | 35.00 ± 1.00 | 35.56 ± 0.50 | - |",
                       "| In-domain ASR source (W_ASR_in) | - | - | - | 23.09 |",
                       "| Out-of-domain ASR source (W_ASR_out) | - | - | - | 37.86 |"]
    out = tmp_path / "t"
    assert CR.main([str(exps / "dual"), "--out", str(out), "--source",
                    f"SER source (W_SER)={tmp_path / 'ser' / 'metrics.json'}"]) == 0
    assert "| SER source (W_SER) | 39.00 ± 1.00" in (tmp_path / "t.md").read_text()
    with pytest.raises(DataError, match="expected LABEL=path"):
        CR.parse_source("no-equals-sign")
    with pytest.raises(DataError, match="metrics.json of source model 'ASR' not found"):
        CR.collect([exps / "dual"], [("ASR", tmp_path / "missing" / "metrics.json")])


# ---------------------------------------------------------------------------------------------------------------
# --significance: the table marked against reference rows (tools.compare_rows), table.md unchanged
# ---------------------------------------------------------------------------------------------------------------
CLASSES = ["A", "B", "C", "D", "E"]


def predictions(folder, better):
    """500 utterances, 5 classes x 100: UAR (and MaF1) 0.50, or 0.60 with ``better`` (15 more right per class, 5
    fewer): paired against each other the difference is far beyond chance."""
    lines = ["id,true,pred," + ",".join(CLASSES)]
    for c in range(5):
        for i in range(100):
            right = i < 45 or (50 <= i < 65 if better else 45 <= i < 50)
            lines.append(f"u{c}_{i},{CLASSES[c]},{CLASSES[c if right else (c + 1) % 5]}," + ",".join(["0.2"] * 5))
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def marked_exps(tmp_path):
    root = tmp_path / "rows"
    write(root / "setup1" / "1986" / "metrics.json", {
        "experiment": "setup1", "table_rows": [{"part": "Part 2", "row": "Setup 1", "order": 1}],
        "test": ser(0.5, [0.47, 0.53], 0.5, [0.47, 0.53], 0.5, [0.47, 0.53])})
    write(root / "setup4" / "1986" / "metrics.json", {
        "experiment": "setup4", "table_rows": [{"part": "Part 2", "row": "Setup 4", "order": 4},
                                               {"part": "Part 3", "row": "In-domain", "order": 2}],
        "test": ser(0.6, [0.57, 0.63], 0.6, [0.57, 0.63], 0.6, [0.57, 0.63])})
    write(root / "out" / "1986" / "metrics.json", {
        "experiment": "out", "table_rows": [{"part": "Part 3", "row": "Out-of-domain", "order": 1}],
        "test": ser(0.5, [0.47, 0.53], 0.5, [0.47, 0.53], 0.5, [0.47, 0.53])})
    write(root / "asr" / "metrics.json", {"experiment": "asr", "part": "Part 9", "wer": 0.5})  # no predictions
    for name, better in (("setup1", False), ("setup4", True), ("out", False)):
        predictions(root / name / "1986", better)
    return root


def test_significance_marks(marked_exps, tmp_path):
    rows = CR.collect([marked_exps])
    plain = CR.markdown_table(rows)
    md, csv_path = CR.write_significance(rows, tmp_path / "sig", [("†", "Setup 1"), ("‡", "Setup 4")],
                                         num_bootstraps=200, num_permutations=999)
    assert CR.markdown_table(rows) == plain and "marks" not in rows[0]  # the plain table is left as it was
    text = md.read_text(encoding="utf-8").splitlines()
    # out = setup1's predictions: differs from Setup 4 only; Setup 4's three rows are one system
    assert text[2:9] == [
        "| **Part 2** | | | | |",
        "| Setup 1 | 50.00 ± 3.00‡ | 50.00 ± 3.00 | 50.00 ± 3.00‡ | - |",
        "| Setup 4 | 60.00 ± 3.00† | 60.00 ± 3.00 | 60.00 ± 3.00† | - |",
        "| **Part 3** | | | | |",
        "| Out-of-domain | 50.00 ± 3.00‡ | 50.00 ± 3.00 | 50.00 ± 3.00‡ | - |",
        "| In-domain | 60.00 ± 3.00† | 60.00 ± 3.00 | 60.00 ± 3.00† | - |",
        "| **Part 9** | | | | |"]
    assert text[11:13] == ["† differs from *Setup 1* (Holm-adjusted p < 0.05)",
                           "‡ differs from *Setup 4* (Holm-adjusted p < 0.05)"]
    assert "Holm–Bonferroni over the 6 comparisons" in text[14] and "sig.csv" in text[14]
    assert text[15] == "Not tested (no predictions file): asr."
    with open(csv_path, newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [(g["mark"], g["row"], g["metric"]) for g in got] == [
        ("†", "Setup 4", "uar"), ("†", "Setup 4", "macro_f1"), ("†", "Out-of-domain", "uar"),
        ("†", "Out-of-domain", "macro_f1"), ("‡", "Out-of-domain", "uar"), ("‡", "Out-of-domain", "macro_f1")]
    # Setup 4 vs Setup 1 is tested once (under †) and marks both rows: 6 comparisons, not 8
    g = got[0]
    assert float(g["delta"]) == pytest.approx(0.1, abs=1e-12) and float(g["a"]) == 0.5 and g["n"] == "500"
    # no random swap reaches Δ: p = 2 / 1000; the four smallest of 6 become 6p, 5p, 4p, 3p, the running max 0.012
    assert float(g["p"]) == pytest.approx(0.002) and float(g["p_holm"]) == pytest.approx(0.012)
    assert g["significant"] == "True" and float(g["ci_low"]) > 0 and g["folders"] == str(marked_exps / "setup4" / "1986")
    same = got[2]  # out vs Setup 1: identical predictions
    assert (float(same["delta"]), float(same["ci_low"]), float(same["ci_high"]), float(same["p_holm"])) == (0, 0, 0, 1)
    assert float(got[4]["delta"]) == pytest.approx(-0.1, abs=1e-12) and got[4]["reference"] == "Setup 4"


def test_significance_cli_and_errors(marked_exps, tmp_path):
    out = tmp_path / "res"
    assert CR.main([str(marked_exps), "--out", str(out / "table"), "--significance", str(out / "table_significance"),
                    "--mark", "†=Setup 1", "--num_permutations", "99", "--num_bootstraps", "50"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["table.csv", "table.md", "table_significance.csv",
                                                     "table_significance.md"]
    assert "†" not in (out / "table.md").read_text(encoding="utf-8")
    assert CR.main([str(marked_exps), "--out", str(out / "t"), "--significance", str(out / "s"),
                    "--mark", "†=Setup 9"]) == 2
    with pytest.raises(SystemExit):
        CR.main([str(marked_exps), "--out", str(out / "t"), "--significance", str(out / "s")])
