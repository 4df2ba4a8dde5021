#!/usr/bin/env python3
"""Average IEMOCAP results over the folds (5 leave-one-session-out folds by default) and the seeds: UA and WA (what
IEMOCAP papers report) with 95% confidence intervals, one row per experiment.

    python recipes/IEMOCAP/average_folds.py exp/iemocap/ser exp/iemocap/rows --out exp/iemocap/results/folds

Each argument is a ``metrics.json`` file or a folder searched recursively for them. Every file must hold
``experiment`` and ``fold`` (the IEMOCAP train.py files write both) and the test metrics of that fold: ``test.uar``
(UA, unweighted accuracy = mean per-class recall), ``test.accuracy`` (WA, weighted accuracy = share correct),
``test.macro_f1``, ``test.confusion``; ASR-CTC runs hold ``wer`` instead. Files are grouped by ``experiment``; the
runs of one fold are its seeds, told apart by ``seed`` (metrics.json; the IEMOCAP AdaLTM train.py writes it) or,
for an older file without it, the ``seed:`` of the ``hyperparams.yaml`` beside it. A fold and seed present twice
for one experiment is an error naming both files.

**Seeds, then folds.** Per experiment, fold and metric the seeds are averaged first (the fold's value); then over
the folds: the **mean** and a **Student-t 95% interval** ``mean ± t_{0.975, n-1} · s / sqrt(n)`` (s: sample
standard deviation of the n fold values; n = 5: t = 2.776; ``lobes.significance.t_interval``, the aggregation used
over seeds in the MSP-Podcast tables). The repeated unit is the **fold**: seeds are not counted as extra samples,
because the seeds of one fold share its test session and training data, so their spread is not the between-session
spread a reader wants bounded (counting folds × seeds as n would narrow the interval without new sessions). We chose
the t-interval over a bootstrap of the pooled test predictions because the folds differ mostly by session
(speakers, scripts): a pooled utterance bootstrap treats the 5 test sets as one sample and leaves this
between-session variance out, giving intervals that are too narrow for "another speaker pair". With n < 2 folds
no interval is given. Also reported: **pooled** UA / WA of the summed confusion matrices (each fold's confusion
averaged over its seeds, then summed: every test utterance counted once; fold sizes differ, so pooled WA is not the
mean of the folds' WA), every fold's value and the seeds found per fold.

Writes ``<out>.md`` (UA, WA, MaF1 in % as ``mean ± half-width``, pooled UA / WA, folds, seeds), ``<out>.csv``
(fractions: ``{metric}_mean, {metric}_ci_low, {metric}_ci_high, {metric}_std, {metric}_fold{k}`` (the fold's mean
over seeds), pooled values, n_folds, folds, seeds, seeds_per_fold) and ``<out>.json`` (the same rows, plus every
run's value: ``per_seed``). Rows are ordered by their first ``table_rows`` entry (part, order), runs without one
(the SER fine-tuning baseline) first.
"""
import argparse
import csv
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.metrics import metrics_from_confusion, read_metrics
from lobes.significance import t_interval  # the seeds' aggregation too: one Student-t code for repeated units

N_FOLDS = 5        # leave one session out; --n_folds 10 for split_protocol speakers, 1 for random
MAX_FOLD = 10      # folds of the speakers protocol (iemocap_prepare.PROTOCOL_FOLDS)
METRICS = {"ua": ("test", "uar"), "wa": ("test", "accuracy"), "macro_f1": ("test", "macro_f1"), "wer": (None, "wer"),
           "wer_norm": (None, "wer_whisper_norm")}  # WER after Whisper's English normaliser: CSV / JSON only
CONFIDENCE = 0.95


def _metric(data, where, key):
    section, name = METRICS[key]
    src = data.get(section) if section else data
    value = src.get(name) if isinstance(src, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: {section + '.' if section else ''}{name} = {value!r} is not a finite number")
    return float(value)


def _seed(data, path):
    """The run's seed: metrics.json ``seed``, else the ``seed:`` line of the hyperparams.yaml beside it, else None."""
    seed = data.get("seed")
    if seed is None:
        hp = Path(path).with_name("hyperparams.yaml")
        found = re.search(r"^seed: *(\d+) *(#.*)?$", hp.read_text(encoding="utf-8"), re.M) if hp.is_file() else None
        seed = int(found.group(1)) if found else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DataError(f"{path}: 'seed' must be an integer, got {seed!r}")
    return seed


def load_folds(paths):
    """``{experiment: {"folds": {fold: {seed: metrics dict}}, "files": {fold: {seed: path}}, "table_rows"}}`` from
    metrics.json files/folders (seed None: the run records none; then it must be its fold's only run)."""
    from tools.collect_results import find_metrics_files

    runs = {}
    for path in find_metrics_files(paths):
        data = read_metrics(path)
        exp, fold = data.get("experiment"), data.get("fold")
        if not isinstance(exp, str) or not exp:
            raise DataError(f"{path}: no 'experiment' name (written by the IEMOCAP train.py files)")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= MAX_FOLD:
            raise DataError(f"{path}: 'fold' must be a fold 1..{MAX_FOLD}, got {fold!r}")
        seed = _seed(data, path)
        run = runs.setdefault(exp, {"folds": {}, "files": {}, "table_rows": data.get("table_rows") or []})
        files = run["files"].setdefault(fold, {})
        if seed in files or (files and (seed is None or None in files)):
            other = files.get(seed, next(iter(files.values())))
            raise DataError(f"experiment {exp!r}: fold {fold} twice, in {other} and {path}"
                            + (f" (seed {seed})" if seed in files and seed is not None else
                               " (a run without a recorded seed cannot be told apart from another run)"))
        run["folds"].setdefault(fold, {})[seed] = data
        files[seed] = str(path)
    return runs


def _fold_values(exp, run, key):
    """``({fold: mean over its seeds}, {fold: {seed: value}})`` of one metric; None when no run has it."""
    per_seed = {k: {s: _metric(d, run["files"][k][s], key) for s, d in seeds.items()}
                for k, seeds in sorted(run["folds"].items())}
    if all(v is None for seeds in per_seed.values() for v in seeds.values()):
        return None, None
    missing = [run["files"][k][s] for k, seeds in per_seed.items() for s, v in seeds.items() if v is None]
    if missing:
        raise DataError(f"experiment {exp!r}: {METRICS[key][1]} missing in {missing}")
    return {k: float(np.mean(list(seeds.values()))) for k, seeds in per_seed.items()}, per_seed


def _seed_label(seeds):
    return "-" if seeds == [None] else " ".join(str(s) for s in seeds)


def summarise(exp, run):
    """One result row (a flat dict of fractions, plus ``per_seed``) for one experiment's folds and seeds."""
    folds = sorted(run["folds"])
    seeds = sorted({s for k in folds for s in run["folds"][k]}, key=lambda s: (s is not None, s or 0))
    row = {"experiment": exp, "n_folds": len(folds), "folds": " ".join(str(k) for k in folds),
           "seeds": _seed_label(seeds), "seeds_per_fold": " ".join(str(len(run["folds"][k])) for k in folds),
           "per_seed": {}}
    placement = run["table_rows"][0] if run["table_rows"] else {}
    row["row"] = placement.get("row") or exp
    row["part"] = placement.get("part")
    row["order"] = placement.get("order")
    for key in METRICS:
        values, per_seed = _fold_values(exp, run, key)
        if values is None:
            continue
        row[f"{key}_mean"], row[f"{key}_ci_low"], row[f"{key}_ci_high"], row[f"{key}_std"] = \
            t_interval(list(values.values()), CONFIDENCE)
        for k, v in values.items():
            row[f"{key}_fold{k}"] = v
        row["per_seed"][key] = {str(k): {str(s): v for s, v in vals.items()} for k, vals in per_seed.items()}
    confusions = {k: [d.get("test", {}).get("confusion") for d in run["folds"][k].values()] for k in folds}
    if confusions and all(c is not None for cs in confusions.values() for c in cs):
        shapes = {np.asarray(c).shape for cs in confusions.values() for c in cs}
        if len(shapes) != 1:
            raise DataError(f"experiment {exp!r}: folds have confusion matrices of different shapes {shapes}")
        # each fold's confusion averaged over its seeds: a fold counts its test utterances once
        per_fold = [np.mean([np.asarray(c, dtype=np.float64) for c in cs], axis=0) for cs in confusions.values()]
        pooled = metrics_from_confusion(np.sum(per_fold, axis=0))
        row["ua_pooled"], row["wa_pooled"] = pooled["uar"], pooled["accuracy"]
        row["n"] = int(round(float(np.sum([np.sum(c) for c in per_fold]))))
    return row


def average_folds(paths):
    """Rows (see ``summarise``) for every experiment found under ``paths``, in table order."""
    runs = load_folds(paths)
    rows = [summarise(exp, run) for exp, run in runs.items()]
    return sorted(rows, key=lambda r: (r["part"] is not None, r["part"] or "", r["order"] if r["order"] is not None
                                       else math.inf, r["row"]))


def _pct(row, key):
    if f"{key}_mean" not in row:
        return "-"
    mean = 100 * row[f"{key}_mean"]
    if row[f"{key}_ci_low"] is None:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * (row[f'{key}_ci_high'] - row[f'{key}_mean']):.2f}"


def _seeds_cell(r):
    counts = set(r["seeds_per_fold"].split())
    if r["seeds"] == "-":
        return "-"
    return r["seeds"] + ("" if len(counts) == 1 else f" (per fold: {r['seeds_per_fold']})")


def markdown(rows, n_folds=N_FOLDS):
    protocol = {5: "leave-one-session-out", 10: "leave-one-speaker-out", 1: "random split"}.get(n_folds, "folds")
    lines = [f"IEMOCAP, {protocol}: mean over folds (each fold: the mean over its seeds) ± half-width of the "
             f"Student-t {CONFIDENCE:.0%} interval over the folds, in %; pooled = summed confusion matrices", "",
             "| Method/Setup | UA | WA | MaF1 | WER | UA pooled | WA pooled | folds | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    part = object()
    for r in rows:
        if r["part"] != part and r["part"] is not None:
            lines.append(f"| **{r['part']}** | | | | | | | | |")
        part = r["part"]
        pooled = [f"{100 * r[k]:.2f}" if k in r else "-" for k in ("ua_pooled", "wa_pooled")]
        folds = r["folds"] if r["n_folds"] == n_folds else f"{r['folds']} (incomplete: {r['n_folds']}/{n_folds})"
        lines.append(f"| {r['row']} | {_pct(r, 'ua')} | {_pct(r, 'wa')} | {_pct(r, 'macro_f1')} | {_pct(r, 'wer')} | "
                     f"{pooled[0]} | {pooled[1]} | {folds} | {_seeds_cell(r)} |")
    return "\n".join(lines) + "\n"


def csv_text(rows, n_folds=N_FOLDS):
    cols = ["part", "row", "order", "experiment", "n_folds", "folds", "seeds", "seeds_per_fold", "n", "ua_pooled",
            "wa_pooled"]
    last = max([n_folds] + [int(k) for r in rows for k in r["folds"].split()])
    for key in METRICS:
        cols += [f"{key}_{s}" for s in ("mean", "ci_low", "ci_high", "std")] + [f"{key}_fold{k}"
                                                                              for k in range(1, last + 1)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    return buf.getvalue()


def write_tables(rows, out, n_folds=N_FOLDS):
    out = Path(out)
    for suffix, text in ((".md", markdown(rows, n_folds)), (".csv", csv_text(rows, n_folds)),
                         (".json", json.dumps(rows, indent=2))):
        with atomic_write(out.with_name(out.name + suffix), encoding="utf-8") as f:
            f.write(text)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Average IEMOCAP fold metrics over seeds, then folds: UA / WA means "
                                            "with Student-t 95% CIs over the folds.")
    p.add_argument("paths", nargs="+", help="metrics.json files or folders searched for them")
    p.add_argument("--out", required=True, help="output prefix: <out>.md, <out>.csv, <out>.json")
    p.add_argument("--n_folds", type=int, default=N_FOLDS,
                   help="folds of a complete experiment: 5 (sessions), 10 (speakers), 1 (random)")
    args = p.parse_args(argv)
    try:
        rows = average_folds(args.paths)
        write_tables(rows, args.out, args.n_folds)
    except DataError as e:
        sys.exit(f"Error: {e}")
    print(markdown(rows, args.n_folds), end="")


if __name__ == "__main__":
    main()
