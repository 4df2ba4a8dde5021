#!/usr/bin/env python3
"""HarmoniFuse results table: WER clean / other, UA, WA and MaF1 (all in %, each ± the half-width of its 95% CI).

    python recipes/MSP-Podcast/harmonifuse/make_table.py EXP_ROWS_DIR [...] --out results/harmonifuse_table

Reads every ``metrics.json`` below the ``EXP_ROWS_DIR`` folders (run.sh passes each row's run of one seed),
as ``train.py`` writes them (``wer_clean`` / ``wer_other`` with ``*_ci``, and the SER ``test`` report with
``uar_ci``, ``accuracy_ci``, ``macro_f1_ci``), and writes ``<out>.md``. Rows are placed by their ``table_rows``
entries (part, row, order), as ``tools.collect_results`` does; ``–`` where a row has no value (single-task rows).
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

COLUMNS = (("WER clean", "wer_clean", None), ("WER other", "wer_other", None), ("UA", "uar", "test"),
           ("WA", "accuracy", "test"), ("MaF1", "macro_f1", "test"))


def cell(metrics, key, section):
    src = metrics.get(section, {}) if section else metrics
    value = src.get(key)
    if value is None:
        return "–"
    ci = src.get(f"{key}_ci")
    text = f"{100 * value:.2f}"
    if ci:
        text += f" ± {100 * (ci[1] - ci[0]) / 2:.2f}"
    return text


def rows_of(paths):
    rows = []
    for path in paths:
        m = json.loads(Path(path).read_text())
        entries = m.get("table_rows") or [{"part": "", "row": m.get("experiment", Path(path).parent.name)}]
        for e in entries:
            rows.append((e.get("part", ""), e.get("order", 1e9), e.get("row", m.get("experiment")), m))
    return sorted(rows, key=lambda r: (r[0], r[1], r[2]))


def make_table(paths):
    lines, part = [], None
    rows = rows_of(paths)
    seen = Counter((p, label) for p, _, label, _ in rows)
    for p, _, label, m in rows:
        if seen[(p, label)] > 1:  # e.g. the IEMOCAP folds of one row file: tell them apart
            label = f"{label} ({m.get('experiment')})"
        if p != part:
            part = p
            lines += ["", f"### {p}" if p else "", "", "| row | " + " | ".join(c[0] for c in COLUMNS) + " |",
                      "|---" * (len(COLUMNS) + 1) + "|"]
        lines.append(f"| {label} | " + " | ".join(cell(m, k, s) for _, k, s in COLUMNS) + " |")
    return "\n".join(lines).strip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp_dir", nargs="+", help="folders searched for metrics.json (e.g. rows/, or rows/*/<seed>)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    paths = sorted({p for d in a.exp_dir for p in Path(d).rglob("metrics.json")})
    if not paths:
        sys.exit(f"{a.exp_dir}: no metrics.json found")
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from lobes.io_utils import atomic_write

    text = make_table(paths)
    out = Path(a.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
