"""Collect experiments' ``metrics.json`` files into a Table-1 style results table.

    python -m tools.collect_results EXP_DIR [EXP_DIR ...] --out results/table

Each argument is a ``metrics.json`` file or a folder searched recursively for ``metrics.json``. Writes
``<out>.md`` (Method/Setup | UAR | Pre. | MaF1 | WER, in %, each SER value with the half-width of its 95% CI,
``38.94 ± 0.61``; ``-`` where a value is absent) and ``<out>.csv`` (one row per experiment, numeric columns as
fractions exactly as in metrics.json, CI bounds as ``*_ci_low`` / ``*_ci_high``, empty cells where absent).

Row placement comes from optional keys of metrics.json (top level, or inside a ``table_order`` object)::

    {"part": "Part 2: Ablation", "row": "Setup 4: Proposed Dual-Vector", "order": 4}

One experiment can fill several rows (the paper's in-domain dual-vector run appears in Parts 2, 3 and 4) with
``"table_rows": [{"part": ..., "row": ..., "order": ...}, ...]``: one row per entry, same metrics.

Reference rows of the source models (§3.1: the SER source, MaF1 35.56% in the paper; the in- and out-of-domain
ASR sources, WER 23.09% / 37.86%) come from ``--source "LABEL=metrics.json"`` (repeatable): that file's metrics
(SER recipe: ``test``; ``tools.eval_asr``: ``wer``) fill a row ``LABEL`` in the part ``SOURCE_PART``, in the
order given, whatever placement the file itself holds.

Rows are grouped by ``part`` (parts in natural order, "Part 2" before "Part 10"; rows without a part first, under
no heading); inside a part, rows with ``order`` come first by ascending order, then the rest alphabetically by
label. The label is ``row``, else ``experiment``, else the folder holding metrics.json.

Significance marks (a separate table; ``<out>.md`` is never marked)::

    ... --significance results/table_significance --mark "†=Setup 1: Baseline (Frozen Backbone)" \
        --mark "‡=Setup 4: Proposed Dual-Vector"

compares every row that has per-utterance predictions beside its metrics.json (``predictions.csv``; ASR:
``asr_predictions.csv``) with each ``--mark`` row on the utterances both scored (``tools.compare_rows``): UAR and
MaF1 (and WER), paired bootstrap CI of Δ and permutation p, Holm–Bonferroni over all comparisons of the table.
Writes ``<PREFIX>.md``, the table with the symbol after each value that differs from that reference at
Holm-adjusted p < ``--alpha`` and a legend, and ``<PREFIX>.csv``, one line per comparison (Δ = row − reference,
CI, p, adjusted p). Rows sharing one label (several metrics.json: seeds) are one system, paired seed by seed.

Several runs of one row (seeds: ``rows/<row>/<seed>/metrics.json``, one label)::

    ... --seeds_table results/table_seeds

writes ``<PREFIX>.md`` and ``.csv``, one line per label (not per run): UAR / Pre. / MaF1 / WER as the **mean over
runs ± the half-width of its Student-t 95% interval** (``lobes.significance.t_interval``, the aggregation IEMOCAP's
folds use), beside the **pooled** value: every run's test predictions taken together, with the 95% bootstrap CI of
``lobes.metrics`` (the confidence-intervals toolkit's scheme) whose condition is the utterance, so each draw takes
utterances with their runs. The t-interval answers "another seed", the pooled CI "other test utterances". With
``--significance``, the pooled cells carry the same marks (those tests pair the runs seed by seed). In ``<out>.md``
each run of a label with several runs is named by its folder (``Setup 4 (1987)``); with one run per label the
table is as before.
"""
import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path

import numpy as np

from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.metrics import read_metrics

SER_KEYS = ("uar", "precision", "macro_f1")
SOURCE_PART = "Part 0: Source models (reference, §3.1)"
HEADER = ("Method/Setup", "UAR", "Pre.", "MaF1", "WER")
CSV_COLUMNS = (
    "part", "row", "order", "experiment", "path",
    "uar", "uar_ci_low", "uar_ci_high",
    "precision", "precision_ci_low", "precision_ci_high",
    "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high",
    "accuracy", "n", "wer", "wer_ci_low", "wer_ci_high",
)


def find_metrics_files(paths):
    """``metrics.json`` files named by ``paths`` (files, or folders searched recursively), deduplicated, in order."""
    found = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(p.rglob("metrics.json"))
            if not hits:
                raise DataError(f"{p}: no metrics.json found in this folder or below")
            found.extend(hits)
        else:
            raise DataError(f"{p}: no such file or folder")
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _number(value, where, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _ci(value, where):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DataError(f"{where}: expected [low, high], got {value!r}")
    low, high = (_number(v, where, allow_none=False) for v in value)
    if low > high:
        raise DataError(f"{where}: low {low} > high {high}")
    return [low, high]


def rows_from_metrics(data, path):
    """Table rows of one loaded metrics.json: one per ``table_rows`` entry, else one (see module doc)."""
    entries = data.get("table_rows")
    if entries is None:
        return [row_from_metrics(data, path)]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: 'table_rows' must be a list of {{part, row, order}} objects")
    if not entries:  # a run kept out of the table on purpose (e.g. rows beyond the paper: table_rows: [])
        print(f"collect_results: {path} has table_rows: [] (not a table row), left out", file=sys.stderr)
        return []
    return [row_from_metrics(data, path, placement=e) for e in entries]


def row_from_metrics(data, path, placement=None):
    """One table row (a flat dict) from a loaded metrics.json; DataError naming ``path`` on malformed content.

    ``placement`` ({part, row, order}) overrides the file's own top-level / ``table_order`` keys.
    """
    if placement is None:
        placement = dict(data)
        if isinstance(data.get("table_order"), dict):
            placement.update(data["table_order"])
    test = data.get("test")
    if test is not None and not isinstance(test, dict):
        raise DataError(f"{path}: 'test' must be an object of SER metrics")
    test = test or {}
    row = {
        "part": placement.get("part"),
        "row": placement.get("row"),
        "order": _number(placement.get("order"), f"{path}: order"),
        "experiment": data.get("experiment") or Path(path).parent.name,
        "path": str(path),
        "accuracy": _number(test.get("accuracy"), f"{path}: test.accuracy"),
        "n": test.get("n"),
        "wer": _number(data.get("wer"), f"{path}: wer"),
        "wer_ci": _ci(data.get("wer_ci"), f"{path}: wer_ci"),
    }
    for key in SER_KEYS:
        row[key] = _number(test.get(key), f"{path}: test.{key}")
        row[f"{key}_ci"] = _ci(test.get(f"{key}_ci"), f"{path}: test.{key}_ci")
    if all(row[k] is None for k in SER_KEYS) and row["wer"] is None:
        raise DataError(f"{path}: holds neither test SER metrics (test.uar/precision/macro_f1) nor a wer")
    for key in ("part", "row"):
        if row[key] is not None and not isinstance(row[key], str):
            raise DataError(f"{path}: '{key}' must be a string, got {row[key]!r}")
    row["label"] = row["row"] or row["experiment"]
    return row


def _natural(text):
    """Sort key that orders embedded numbers numerically ("Part 2" < "Part 10")."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def sort_rows(rows):
    """Table order: no-part rows first, then parts in natural order; in a part, by ``order``, then by label."""
    def key(r):
        part = r.get("part")
        order = r.get("order")
        return (part is not None, _natural(part or ""),
                order is None, order if order is not None else 0.0, _natural(r["label"]))

    return sorted(rows, key=key)


def parse_source(spec):
    """``"LABEL=path/metrics.json"`` -> ``(label, Path)``; DataError for a spec without both parts."""
    label, sep, path = str(spec).partition("=")
    if not sep or not label.strip() or not path.strip():
        raise DataError(f"--source {spec!r}: expected LABEL=path/to/metrics.json")
    return label.strip(), Path(path.strip())


def source_rows(sources):
    """Rows of the source models: ``sources`` is a list of ``(label, metrics.json)``, placed in ``SOURCE_PART``."""
    rows = []
    for order, (label, path) in enumerate(sources, start=1):
        if not Path(path).is_file():
            raise DataError(f"{path}: metrics.json of source model '{label}' not found")
        rows.append(row_from_metrics(read_metrics(path), path,
                                     placement={"part": SOURCE_PART, "row": label, "order": order}))
    return rows


def collect(paths, sources=()):
    """Rows (dicts, in table order) for every metrics.json named by or found below ``paths``, plus ``sources``."""
    files = find_metrics_files(paths)
    rows = [row for f in files for row in rows_from_metrics(read_metrics(f), f)]
    return sort_rows(source_rows(sources) + rows)


def _pct(value):
    return f"{100 * value:.2f}"


def format_cell(value, ci=None):
    """``value`` in % with 2 decimals, plus ``± half-width`` of the CI, ``100 * (high - low) / 2``; ``-`` if None."""
    if value is None:
        return "-"
    if ci is None:
        return _pct(value)
    return f"{_pct(value)} ± {100 * (ci[1] - ci[0]) / 2:.2f}"


def run_names(rows):
    """Per row, the name of its run when its label has several metrics.json (their folder, e.g. the seed), else
    None."""
    paths = {}
    for r in rows:
        paths.setdefault(r["label"], set()).add(Path(r["path"]).parent)
    return [Path(r["path"]).parent.name if len(paths[r["label"]]) > 1 else None for r in rows]


def _part_heading(lines, part, current, width):
    if part is not None and part != current:
        lines.append(f"| **{part}** |" + " |" * (width - 1))
    return part


def markdown_table(rows):
    """Markdown text: header, then rows in the given order with a bold heading row whenever ``part`` changes.

    A row's optional ``marks`` ({metric: "†‡"}, from ``tools.compare_rows.mark_rows``) follow its cells. Runs of a
    label with several (seeds) are told apart by their folder name after the label."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + [":---:"] * (len(HEADER) - 1)) + "|"]
    current = None
    for r, run in zip(rows, run_names(rows)):
        current = _part_heading(lines, r.get("part"), current, len(HEADER))
        cells = [r["label"].replace("|", "\\|") + (f" ({run})" if run else "")]
        marks = r.get("marks") or {}
        cells += [format_cell(r.get(k), r.get(f"{k}_ci")) + marks.get(k, "") for k in (*SER_KEYS, "wer")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows):
    """CSV text, ``CSV_COLUMNS`` in that order; numbers as Python ``repr`` (full precision), None as empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        flat = dict(r)
        for key in (*SER_KEYS, "wer"):
            ci = r.get(f"{key}_ci")
            flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = ci if ci is not None else (None, None)
        writer.writerow(["" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def write_table(rows, out_prefix):
    """Write ``<out_prefix>.md`` and ``<out_prefix>.csv`` atomically; returns their paths."""
    out_prefix = Path(out_prefix)
    if out_prefix.suffix in (".md", ".csv"):  # "--out results/table.md" means the same prefix
        out_prefix = out_prefix.with_suffix("")
    md = out_prefix.with_name(out_prefix.name + ".md")
    csv_path = out_prefix.with_name(out_prefix.name + ".csv")
    with atomic_write(md) as f:
        f.write(markdown_table(rows))
    with atomic_write(csv_path, newline="") as f:
        f.write(csv_text(rows))
    return md, csv_path


def mark_rows(rows, marks, alpha=0.05, num_bootstraps=1000, num_permutations=10000, seed=0):
    """``(marked copies of rows, comparisons)``: ``tools.compare_rows.compare_to_references``; ``rows`` unchanged."""
    from tools import compare_rows as CMP

    rows = [dict(r) for r in rows]
    comparisons = CMP.compare_to_references(rows, marks, alpha=alpha, num_bootstraps=num_bootstraps,
                                            num_permutations=num_permutations, seed=seed)
    return rows, comparisons


def write_significance(rows, out_prefix, marks, alpha=0.05, num_bootstraps=1000, num_permutations=10000, seed=0,
                       marked=None):
    """The table with significance marks (``<out_prefix>.md``, legend below) and the comparisons behind them
    (``<out_prefix>.csv``), see ``tools.compare_rows.compare_to_references``. ``rows`` are left unchanged;
    ``marked``: ``mark_rows``' result when already computed."""
    from tools import compare_rows as CMP

    rows, comparisons = marked or mark_rows(rows, marks, alpha, num_bootstraps, num_permutations, seed)
    out_prefix = Path(out_prefix)
    md, csv_path = out_prefix.with_name(out_prefix.name + ".md"), out_prefix.with_name(out_prefix.name + ".csv")
    with atomic_write(md, encoding="utf-8") as f:
        f.write(markdown_table(rows) + CMP.legend(comparisons, marks, rows, alpha, num_permutations, csv_path.name))
    with atomic_write(csv_path, newline="", encoding="utf-8") as f:
        f.write(CMP.comparisons_csv(comparisons, num_bootstraps, num_permutations))
    return md, csv_path


# ----------------------------------------------------------------------------------------------------------------
# Several runs of one row (seeds): mean ± Student-t interval over runs, beside the pooled bootstrap CI
# ----------------------------------------------------------------------------------------------------------------
SEED_METRICS = (*SER_KEYS, "wer")
SEED_HEADER = ("Method/Setup", "runs", "UAR", "Pre.", "MaF1", "WER", "UAR pooled", "MaF1 pooled", "WER pooled")
POOLED = ("uar", "macro_f1", "wer")


def pooled_metrics(system, num_bootstraps=1000, seed=0):
    """``{metric: (value, [low, high])}`` of one system's runs taken together (``compare_rows.systems_of`` entry:
    ``{kind: {run: predictions file}}``), on the utterances every run scored; utterance = bootstrap condition."""
    from lobes.metrics import ser_report, wer_ci
    from tools import compare_rows as CMP

    out = {}
    for kind in ("ser", "asr"):
        runs = system[kind]
        if not runs:
            continue
        _, ids, refs, outs, _, classes, _ = CMP.align([(name, f, f) for name, f in runs.items()])
        utts = np.tile(np.arange(len(ids)), len(runs))  # run-major units; the utterance (its index) is the condition
        flat_refs, flat_outs = [x for run in refs for x in run], [x for run in outs for x in run]
        if kind == "ser":
            index = CMP._class_index(classes, refs, outs)
            rep = ser_report([index[x] for x in flat_refs], [index[x] for x in flat_outs], speakers=utts,
                             num_bootstraps=num_bootstraps, n_classes=len(index), seed=seed)
            out.update({k: (rep[k], rep[f"{k}_ci"]) for k in ("uar", "macro_f1")})
        else:
            value, ci = wer_ci(flat_refs, flat_outs, num_bootstraps=num_bootstraps, seed=seed, conditions=utts)
            out["wer"] = (value, ci)
    return out


def seed_rows(rows, num_bootstraps=1000, seed=0):
    """One row per label of ``rows`` (``collect``, optionally marked by ``compare_to_references``), in table order:
    ``runs`` (folder names), ``{m}_mean / _ci_low / _ci_high / _std / _values`` over the runs (``t_interval``) and
    ``{m}_pooled / _pooled_ci_low / _pooled_ci_high`` (``pooled_metrics``; None without predictions files)."""
    from lobes.significance import t_interval
    from tools.compare_rows import systems_of

    keys, systems = systems_of(rows)
    pooled, out, seen = {}, [], {}
    for r, key in zip(rows, keys):
        if r["label"] in seen:
            seen[r["label"]]["_members"].append(r)
            continue
        if key not in pooled:
            pooled[key] = pooled_metrics(systems[key], num_bootstraps, seed)
        agg = {"part": r.get("part"), "row": r["label"], "marks": r.get("marks") or {}, "_members": [r],
               **{f"{m}_pooled": pooled[key].get(m, (None,))[0] for m in POOLED},
               **{f"{m}_pooled_ci": pooled[key].get(m, (None, None))[1] for m in POOLED}}
        seen[r["label"]] = agg
        out.append(agg)
    for agg in out:
        members = agg.pop("_members")
        agg["runs"] = " ".join(Path(m["path"]).parent.name for m in members)
        agg["n_runs"] = len(members)
        for m in SEED_METRICS:
            values = [x[m] for x in members if x.get(m) is not None]
            if len(values) not in (0, len(members)):
                raise DataError(f"row {agg['row']!r}: {m} in only {len(values)} of its {len(members)} runs "
                                f"({[x['path'] for x in members]})")
            mean, low, high, std = t_interval(values) if values else (None,) * 4
            agg.update({f"{m}_mean": mean, f"{m}_ci_low": low, f"{m}_ci_high": high, f"{m}_std": std,
                        f"{m}_values": " ".join(repr(v) for v in values)})
    return out


def seed_markdown(srows):
    """The seeds table: mean ± t half-width per metric, then the pooled values ± bootstrap half-width (marked)."""
    lines = ["| " + " | ".join(SEED_HEADER) + " |", "|" + "|".join(["---"] + [":---:"] * (len(SEED_HEADER) - 1)) + "|"]
    current = None
    for r in srows:
        current = _part_heading(lines, r["part"], current, len(SEED_HEADER))
        cells = [r["row"].replace("|", "\\|"), str(r["n_runs"])]
        for m in SEED_METRICS:
            ci = None if r[f"{m}_ci_low"] is None else [r[f"{m}_ci_low"], r[f"{m}_ci_high"]]
            cells.append(format_cell(r[f"{m}_mean"], ci))
        cells += [format_cell(r[f"{m}_pooled"], r[f"{m}_pooled_ci"]) + (r["marks"].get(m, "") if r[f"{m}_pooled"]
                                                                       is not None else "") for m in POOLED]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_seed_table(rows, out_prefix, num_bootstraps=1000, seed=0, confidence=0.95):
    """``<out_prefix>.md`` (table and how to read it) and ``<out_prefix>.csv`` (fractions, one line per label)."""
    srows = seed_rows(rows, num_bootstraps, seed)
    out_prefix = Path(out_prefix)
    md, csv_path = out_prefix.with_name(out_prefix.name + ".md"), out_prefix.with_name(out_prefix.name + ".csv")
    several = [r for r in srows if r["n_runs"] > 1] or srows  # the seeds; a single-run source row is no seed
    runs = sorted({x for r in several for x in r["runs"].split()}, key=_natural)
    note = (f"\nMean over the runs ({', '.join(runs)}) ± half-width of the Student-t {confidence:.0%} interval "
            f"(t with runs − 1 degrees of freedom; none for one run); pooled: all runs' test predictions together, "
            f"± half-width of the {confidence:.0%} bootstrap CI ({num_bootstraps} sets of utterances, each with all "
            f"its runs). In %. Per-run values: {csv_path.name}.\n")
    cols = ["part", "row", "n_runs", "runs"]
    for m in SEED_METRICS:
        cols += [f"{m}_{x}" for x in ("mean", "ci_low", "ci_high", "std", "values")]
    for m in POOLED:
        cols += [f"{m}_pooled", f"{m}_pooled_ci_low", f"{m}_pooled_ci_high"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in srows:
        flat = dict(r)
        for m in POOLED:
            flat[f"{m}_pooled_ci_low"], flat[f"{m}_pooled_ci_high"] = r[f"{m}_pooled_ci"] or (None, None)
        writer.writerow(["" if flat.get(c) is None else flat[c] for c in cols])
    with atomic_write(md, encoding="utf-8") as f:
        f.write(seed_markdown(srows) + note)
    with atomic_write(csv_path, newline="", encoding="utf-8") as f:
        f.write(buf.getvalue())
    return md, csv_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="experiment folders (searched recursively) or metrics.json files")
    parser.add_argument("--out", default="results/table", help="output prefix: writes <out>.md and <out>.csv")
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=METRICS_JSON",
                        help=f"a source model's metrics.json as a reference row in '{SOURCE_PART}' (repeatable)")
    sig = parser.add_argument_group("significance marks (paired tests against reference rows)")
    sig.add_argument("--significance", default=None, metavar="PREFIX",
                     help="also write PREFIX.md (the table marked against each --mark row) and PREFIX.csv (Δ, CI, p)")
    sig.add_argument("--mark", action="append", default=[], metavar="SYMBOL=ROW",
                     help="reference row and its symbol, e.g. '†=Setup 1: Baseline (Frozen Backbone)' (repeatable)")
    sig.add_argument("--alpha", type=float, default=0.05, help="level of the Holm-adjusted p-values")
    sig.add_argument("--num_bootstraps", type=int, default=1000, help="bootstrap sets per comparison and per pooled CI")
    sig.add_argument("--num_permutations", type=int, default=10000, help="random swaps per comparison")
    sig.add_argument("--seed", type=int, default=0, help="seed of the resamplings")
    parser.add_argument("--seeds_table", default=None, metavar="PREFIX",
                        help="also write PREFIX.md / .csv: per row, mean ± Student-t CI over its runs (seeds) and the "
                             "pooled bootstrap CI (with --significance: marked)")
    args = parser.parse_args(argv)
    if bool(args.significance) != bool(args.mark):
        parser.error("--significance and --mark go together")
    try:
        rows = collect(args.paths, [parse_source(s) for s in args.source])
        md, csv_path = write_table(rows, args.out)
        marked = None
        if args.significance:
            from tools.compare_rows import parse_mark

            marks = [parse_mark(m) for m in args.mark]
            marked = mark_rows(rows, marks, args.alpha, args.num_bootstraps, args.num_permutations, args.seed)
            sig_files = write_significance(rows, args.significance, marks, args.alpha, args.num_bootstraps,
                                           args.num_permutations, args.seed, marked=marked)
            print(f"wrote {sig_files[0]} and {sig_files[1]}", file=sys.stderr)
        if args.seeds_table:
            seed_files = write_seed_table(marked[0] if marked else rows, args.seeds_table, args.num_bootstraps,
                                          args.seed)
            print(f"wrote {seed_files[0]} and {seed_files[1]}", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(rows), end="")
    print(f"wrote {md} and {csv_path} ({len(rows)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
