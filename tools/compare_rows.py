"""Paired comparison of two results rows on the test utterances both scored: Δ, paired-bootstrap CI, p-value.

    python -m tools.compare_rows A B [--num_bootstraps 1000] [--num_permutations 10000] [--seed 0] [--json OUT]

``A`` and ``B`` are experiment folders or prediction files. SER: ``predictions.csv`` (``id,true,pred,<class
probabilities>``, written by every SER-type recipe) or HarmoniFuse's ``ser_predictions.csv`` (``id,true,pred,
generated``); ASR: a CSV with ``id,ref,hyp`` columns (HarmoniFuse's ``asr_predictions.csv``; its ``split`` column
is chosen with ``--split``). A folder that holds none of them directly is searched below for runs (e.g. one folder
per seed, ``setup4_dual/1986``); the runs of A and B are paired by their path under A / B (seed s with seed s).

Prints, per metric (UAR and MaF1 from SER predictions, WER from ASR ones, where both sides have them), A, B,
Δ = B − A, its 95% paired-bootstrap interval and the two-sided permutation p-value (``lobes.significance``: the
methods and why). Utterances scored by only one side are left out and counted on the first line.
"""
import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from lobes import significance as S
from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.text_io import not_utf8_error

SER_FILES = ("predictions.csv", "ser_predictions.csv")
ASR_FILES = ("asr_predictions.csv",)
LABELS = {"uar": "UAR", "macro_f1": "MaF1", "wer": "WER"}


def _read_csv(path):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), list(reader.fieldnames or [])
    except UnicodeDecodeError as e:  # written by the toolkit as UTF-8: a stray byte is a damaged file
        raise not_utf8_error(path) from e
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read predictions ({e})") from e
    return rows, fields


def _kind(fields, path):
    if {"id", "true", "pred"} <= set(fields):
        return "ser"
    if {"id", "ref", "hyp"} <= set(fields):
        return "asr"
    raise DataError(f"{path}: expected columns id,true,pred (SER) or id,ref,hyp (ASR), got {fields}")


def read_predictions(path, split=None):
    """``(kind, {id: (reference, output)}, classes)`` of one predictions file; kind "ser" (true, pred) or "asr"
    (ref, hyp); ``classes`` = the header's class columns (SER, toolkit format) else []."""
    rows, fields = _read_csv(path)
    kind = _kind(fields, path)
    cols = ("true", "pred") if kind == "ser" else ("ref", "hyp")
    if not rows:
        raise DataError(f"{path}: no predictions")
    if "split" in fields:
        splits = sorted({r["split"] for r in rows})
        if split is None and len(splits) > 1:
            raise DataError(f"{path}: holds the splits {splits}; choose one with --split")
        rows = [r for r in rows if split is None or r["split"] == split]
        if not rows:
            raise DataError(f"{path}: no predictions of split {split!r} (splits: {splits})")
    out = {}
    for line, r in enumerate(rows, start=2):
        if r.get("id") in (None, "") or r[cols[0]] is None or r[cols[1]] is None:
            raise DataError(f"{path}: line {line}: missing id or {cols[0]} / {cols[1]}")
        if r["id"] in out:
            raise DataError(f"{path}: utterance {r['id']!r} twice")
        out[r["id"]] = (r[cols[0]], r[cols[1]])
    classes = fields[3:] if kind == "ser" and "generated" not in fields else []
    return kind, out, classes


def find_runs(path, kind):
    """``{run name: file}`` of one kind ("ser" / "asr") for one side: ``path`` itself if it is such a file (run
    ""), the file in folder ``path``, else every folder below holding one (run = its path under ``path``)."""
    path, names = Path(path), SER_FILES if kind == "ser" else ASR_FILES
    if path.is_file():
        return {"": path} if _kind(_read_csv(path)[1], path) == kind else {}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    for name in names:
        if (path / name).is_file():
            return {"": path / name}
    runs = {}
    for name in names:
        for f in sorted(path.rglob(name)):
            runs.setdefault(str(f.parent.relative_to(path)), f)
    return runs


def pair_runs(runs_a, runs_b, where):
    """``[(name, file A, file B)]``: one run each is one pair; one run against several (a source model against the
    seeds of a row) pairs that run with each of them; else the runs both sides have, by name."""
    if len(runs_a) == 1 and len(runs_b) == 1:
        return [("", *runs_a.values(), *runs_b.values())]
    if len(runs_a) == 1 or len(runs_b) == 1:  # the single system's outputs repeat beside every run of the other
        (only,) = (runs_a if len(runs_a) == 1 else runs_b).values()
        many = runs_b if len(runs_a) == 1 else runs_a
        return [(n, only, f) if len(runs_a) == 1 else (n, f, only) for n, f in sorted(many.items())]
    common = sorted(set(runs_a) & set(runs_b))
    if not common:
        raise DataError(f"{where}: no run in common to pair (A: {sorted(runs_a)}, B: {sorted(runs_b)})")
    return [(n, runs_a[n], runs_b[n]) for n in common]


def align(pairs, split=None):
    """Load every pair and keep the utterances every run of both sides scored. Returns ``(kind, ids, refs, outs_a,
    outs_b, classes, dropped)``: refs / outs are lists over runs of lists over ``ids``; dropped = (only A, only B)."""
    kinds, loaded, classes = set(), [], []
    for _, fa, fb in pairs:
        (ka, pa, ca), (kb, pb, cb) = read_predictions(fa, split), read_predictions(fb, split)
        kinds |= {ka, kb}
        loaded.append((fa, pa, fb, pb))
        classes = classes or ca or cb
    if len(kinds) != 1:
        raise DataError(f"cannot compare SER with ASR predictions: {[str(p[0]) for p in pairs]}")
    all_a = set().union(*(set(pa) for _, pa, _, _ in loaded))
    all_b = set().union(*(set(pb) for _, _, _, pb in loaded))
    keep = set.intersection(*(set(pa) & set(pb) for _, pa, _, pb in loaded))
    if not keep:
        raise DataError(f"{loaded[0][0]} and {loaded[0][2]}: no utterance scored by both")
    ids = [i for i in loaded[0][1] if i in keep]
    refs, outs_a, outs_b = [], [], []
    for fa, pa, fb, pb in loaded:
        for i in ids:
            if pa[i][0] != pb[i][0]:
                raise DataError(f"utterance {i!r}: reference {pa[i][0]!r} in {fa} but {pb[i][0]!r} in {fb}")
        refs.append([pa[i][0] for i in ids])
        outs_a.append([pa[i][1] for i in ids])
        outs_b.append([pb[i][1] for i in ids])
    return kinds.pop(), ids, refs, outs_a, outs_b, classes, (len(all_a - keep), len(all_b - keep))


def _class_index(classes, *label_lists):
    """Class name -> index: the header's classes first (their order), then any other label, sorted."""
    seen = {x for labels in label_lists for run in labels for x in run}
    names = list(classes) + sorted(seen - set(classes))
    return {c: k for k, c in enumerate(names)}


def compare(pairs, split=None, **kw):
    """Comparison of B − A over ``pairs`` (``pair_runs``): ``{"kind", "n", "n_runs", "dropped", "metrics"}``."""
    kind, ids, refs, outs_a, outs_b, classes, dropped = align(pairs, split)

    def flat(lists):  # run-major units, as lobes.significance expects
        return [x for run in lists for x in run]

    if kind == "ser":
        index = _class_index(classes, refs, outs_a, outs_b)
        t, a, b = ([index[x] for x in flat(lists)] for lists in (refs, outs_a, outs_b))
        metrics = S.compare_ser(t, a, b, len(index), n_runs=len(pairs), **kw)
    else:
        ea, words = S.utterance_errors(flat(refs), flat(outs_a))
        eb, _ = S.utterance_errors(flat(refs), flat(outs_b))
        metrics = {"wer": S.compare_wer(words, ea, eb, n_runs=len(pairs), **kw)}
    return {"kind": kind, "n": len(ids), "n_runs": len(pairs), "dropped": list(dropped), "metrics": metrics}


def compare_paths(a, b, split=None, **kw):
    """Every comparison A and B allow (SER, ASR, or both): ``{"ser": ..., "asr": ...}`` (``compare`` results)."""
    out = {}
    for kind in ("ser", "asr"):
        runs_a, runs_b = find_runs(a, kind), find_runs(b, kind)
        if runs_a and runs_b:
            out[kind] = compare(pair_runs(runs_a, runs_b, f"{a} vs {b}"), split, **kw)
    if not out:
        raise DataError(f"{a} and {b}: no predictions file of the same kind on both sides "
                        f"(SER: {', '.join(SER_FILES)}; ASR: {', '.join(ASR_FILES)})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Every row of a results table against reference rows (tools.collect_results --significance)
# ----------------------------------------------------------------------------------------------------------------
COMPARISON_COLUMNS = ("mark", "reference", "row", "folders", "metric", "a", "b", "delta", "ci_low", "ci_high",
                      "p", "p_holm", "significant", "n", "n_runs", "num_bootstraps", "num_permutations")


def parse_mark(spec):
    """``"†=Setup 1: Baseline"`` -> ``("†", "Setup 1: Baseline")``."""
    symbol, sep, label = str(spec).partition("=")
    if not sep or not symbol.strip() or not label.strip():
        raise DataError(f"--mark {spec!r}: expected SYMBOL=row label, e.g. '†=Setup 1: Baseline (Frozen Backbone)'")
    return symbol.strip(), label.strip()


def systems_of(rows):
    """``(key per row, {key: {kind: {run: file}}})``: the run folders behind each table label (several metrics.json
    under one label are its runs, e.g. seeds, named by their folder) and their prediction files."""
    folders = {}
    for r in rows:
        folders.setdefault(r["label"], []).append(Path(r["path"]).parent)
    keys, systems = [], {}
    for r in rows:
        dirs = sorted(set(folders[r["label"]]))
        key = tuple(str(d) for d in dirs)
        keys.append(key)
        if key not in systems and len({d.name for d in dirs}) < len(dirs):
            raise DataError(f"row {r['label']!r}: its runs {list(key)} must have distinct folder names (seeds)")
        if key not in systems:
            systems[key] = {kind: {(d.name if len(dirs) > 1 else ""): f for d in dirs
                                   for f in find_runs(d, kind).values()} for kind in ("ser", "asr")}
    return keys, systems


def compare_to_references(rows, marks, alpha=0.05, **kw):
    """Every system of ``rows`` (``collect_results.collect``) with predictions against each reference row of
    ``marks`` ([(symbol, label)]): one dict per (reference, system, metric) with Δ = system − reference, its CI,
    p and the Holm-adjusted p over all of them; sets ``row["marks"]`` where the adjusted p < ``alpha``. Two
    references are compared once (the second against the first), and that test marks both rows."""
    keys, systems = systems_of(rows)
    key_of = dict(zip((r["label"] for r in rows), keys))
    out, done = [], set()
    for symbol, label in marks:
        if label not in key_of:
            raise DataError(f"--mark {symbol}={label!r}: no such row; rows: {sorted(key_of)}")
        ref_key = key_of[label]
        done.add(ref_key)
        for key in dict.fromkeys(keys):
            if key in done:
                continue
            row = rows[keys.index(key)]
            for kind in ("ser", "asr"):
                if not (systems[ref_key][kind] and systems[key][kind]):
                    continue
                res = compare(pair_runs(systems[ref_key][kind], systems[key][kind], f"{label} vs {row['label']}"),
                              **kw)
                for metric, r in res["metrics"].items():
                    out.append({"mark": symbol, "reference": label, "row": row["label"], "folders": " ".join(key),
                                "metric": metric, **r, "pair": {key, ref_key}})
    for c, p in zip(out, S.holm([c["p"] for c in out]) if out else []):
        c["p_holm"], c["significant"] = float(p), bool(p < alpha)
    compared = set().union(*(c["pair"] for c in out)) if out else set()
    for r, key in zip(rows, keys):
        r["tested"] = key in compared
        r["has_predictions"] = any(systems[key].values())
        r["marks"] = {m: "".join(symbol for symbol, label in marks
                                 if any(c["pair"] == {key, key_of[label]} and c["metric"] == m and c["significant"]
                                        for c in out)) for m in LABELS}
    return out


def legend(comparisons, marks, rows, alpha=0.05, num_permutations=10000, csv_name="comparisons CSV"):
    """Text under the marked table: what each symbol means, the test, the correction, which rows were not tested
    (``rows`` as marked by ``compare_to_references``)."""
    lines = [""]
    for symbol, label in marks:
        lines.append(f"{symbol} differs from *{label}* (Holm-adjusted p < {alpha:g})")
    metrics = sorted({LABELS[c["metric"]] for c in comparisons}, key=list(LABELS.values()).index)
    n = sorted({c["n"] for c in comparisons})
    lines.append("")
    lines.append(f"Paired approximate-randomisation test on the test utterances both rows scored ({'/'.join(map(str, n))}"
                 f" utterances; {num_permutations} random swaps of the two rows' outputs per utterance; WER: sign flips "
                 f"of per-utterance error differences), two-sided, on {', '.join(metrics) or 'no metric'}; "
                 f"Holm–Bonferroni over the {len(comparisons)} comparisons of this table. Pre. is not tested. "
                 f"Δ, its 95% paired-bootstrap CI and p: {csv_name}.")
    for has, why in ((False, "no predictions file"), (True, "no reference row with predictions of the same kind")):
        untested = [r["label"] for r in rows if not r["tested"] and r.get("has_predictions", False) == has]
        if untested:
            lines.append(f"Not tested ({why}): {'; '.join(dict.fromkeys(untested))}.")
    return "\n".join(lines) + "\n"


def comparisons_csv(comparisons, num_bootstraps, num_permutations):
    """Long-format CSV text (fractions, full precision), ``COMPARISON_COLUMNS``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COMPARISON_COLUMNS)
    for c in comparisons:
        flat = {**c, "ci_low": c["ci"][0], "ci_high": c["ci"][1], "num_bootstraps": num_bootstraps,
                "num_permutations": num_permutations}
        w.writerow([flat[k] for k in COMPARISON_COLUMNS])
    return buf.getvalue()


def report(a, b, results, confidence=0.95):
    """The printed table: one line per metric, values in %."""
    lines = [f"A: {a}", f"B: {b}"]
    for res in results.values():
        lines.append(f"{res['kind'].upper()}: {res['n']} utterances scored by both x {res['n_runs']} run(s) "
                     f"(left out: {res['dropped'][0]} only in A, {res['dropped'][1]} only in B)")
        lines.append(f"{'metric':<6} {'A':>7} {'B':>7} {'Δ (B−A)':>8}  {f'{confidence:.0%} CI of Δ':<18} {'p':>7}")
        for m, r in res["metrics"].items():
            ci = f"[{100 * r['ci'][0]:+.2f}, {100 * r['ci'][1]:+.2f}]"
            lines.append(f"{LABELS[m]:<6} {100 * r['a']:7.2f} {100 * r['b']:7.2f} {100 * r['delta']:+8.2f}  "
                         f"{ci:<18} {r['p']:7.4f}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="row A: experiment folder or predictions file (Δ = B − A)")
    p.add_argument("b", help="row B: experiment folder or predictions file")
    p.add_argument("--num_bootstraps", type=int, default=1000, help="paired bootstrap sets for the CI")
    p.add_argument("--num_permutations", type=int, default=10000, help="random swaps for the p-value")
    p.add_argument("--seed", type=int, default=0, help="seed of both resamplings")
    p.add_argument("--split", default=None, help="split of an asr_predictions.csv holding several")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    kw = dict(num_bootstraps=args.num_bootstraps, num_permutations=args.num_permutations, seed=args.seed)
    try:
        results = compare_paths(args.a, args.b, args.split, **kw)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with atomic_write(args.json, encoding="utf-8") as f:
            json.dump({"a": str(args.a), "b": str(args.b), **kw, "results": results}, f, indent=2,
                      default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
            f.write("\n")
    print(report(args.a, args.b, results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
