"""Plot the learned merging coefficients λ and layer weights α of AdaLTM runs (the paper's Figures 2/3).

    python -m tools.plot_coefficients EXP_DIR [EXP_DIR ...] --out DIR [--labels NAME ...]

Each argument is a ``coefficients.json`` file or a folder searched recursively for it. The file, written by the
AdaLTM recipe, holds (either key may be absent, not both)::

    {"lambda": {"ASR": [λ per merge group], "SER": [λ per merge group]},   # MergeCoefficients.as_dict()
     "alpha": [α per layer]}                                               # or {name: [α per layer]}

Writes, under ``--out``: ``<run>_lambda.png`` and ``<run>_alpha.png`` per run and ``lambda_comparison.png``
overlaying the λ of every run. A run is named by ``--labels`` (one per found file, in the printed order), else by
its folder relative to the folders' common parent (``dual/1986``), ``/`` becoming ``_`` in file names.

The paper's two λ figures, from the Table-1 rows' runs (each a ``coefficients.json`` or a run folder holding one):

    --figure2 DUAL ASR_ONLY SER_ONLY   -> figure2_lambda_dual_vs_single.png
        (Figure 2: dual-vector λ_ASR, dual-vector λ_SER, ASR-only λ_ASR, SER-only λ_SER)
    --figure3 IN_DOMAIN OUT_OF_DOMAIN  -> figure3_lambda_domain.png
        (Figure 3: in-domain λ_ASR, in-domain λ_SER, out-of-domain λ_ASR, out-of-domain λ_SER; both dual-vector)

Several seeds (``--seeds 1986 1987 1988``, the figure arguments then being row folders such as ``rows/setup4_dual``):
each line is the mean of the seeds' λ per group, with a band from their minimum to their maximum (three seeds
give a Student-t interval 4.3 standard errors wide, so the band shows the runs themselves); a row with some of
the seeds but not all is an error.

Lines keep the paper's colours (blue, orange, green, red, in the caption's order). A run that does not exist
(a row that was not trained) is left out of its figure and named on stderr; a figure none of whose runs exist is
not drawn.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from lobes.errors import DataError
from lobes.plots import plot_lambda_comparison, plot_lambda_lines, plot_lambdas, plot_layer_weights

FILENAME = "coefficients.json"

# The paper's Figures 2 and 3: (output file, title, [(run role, λ vector name, line label)] in caption order).
FIGURES = {
    "figure2": ("figure2_lambda_dual_vs_single.png", "Layer-wise λ: dual vs single task vectors (Figure 2)",
                ("dual", "asr_only", "ser_only"),
                [("dual", "ASR", "Dual-vector λ_ASR"), ("dual", "SER", "Dual-vector λ_SER"),
                 ("asr_only", "ASR", "ASR-only λ_ASR"), ("ser_only", "SER", "SER-only λ_SER")]),
    "figure3": ("figure3_lambda_domain.png", "Layer-wise λ: in- vs out-of-domain ASR vector (Figure 3)",
                ("in_domain", "out_of_domain"),
                [("in_domain", "ASR", "In-domain λ_ASR"), ("in_domain", "SER", "In-domain λ_SER"),
                 ("out_of_domain", "ASR", "Out-of-domain λ_ASR"), ("out_of_domain", "SER", "Out-of-domain λ_SER")]),
}


def find_coefficient_files(paths):
    """``coefficients.json`` files named by ``paths`` (files, or folders searched recursively), deduplicated."""
    found = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(p.rglob(FILENAME))
            if not hits:
                raise DataError(f"{p}: no {FILENAME} found in this folder or below")
            found.extend(hits)
        else:
            raise DataError(f"{p}: no such file or folder")
    seen, out = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def load_coefficients(path):
    """``(lambdas or None, alphas or None)`` from one file; α given as a list becomes ``{"SER": list}``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    lam, alpha = data.get("lambda"), data.get("alpha")
    if lam is None and alpha is None:
        raise DataError(f"{path}: has neither 'lambda' nor 'alpha'")
    if lam is not None and not isinstance(lam, dict):
        raise DataError(f"{path}: 'lambda' must be {{vector name: [λ per group]}}")
    if isinstance(alpha, list):
        alpha = {"α": alpha}
    elif alpha is not None and not isinstance(alpha, dict):
        raise DataError(f"{path}: 'alpha' must be a list or {{name: [α per layer]}}")
    return lam, alpha


def run_names(files):
    """Each file's folder relative to the common parent of all folders (its own name when there is one run)."""
    dirs = [f.resolve().parent for f in files]
    if len(dirs) == 1:
        return [dirs[0].name]
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    names = [d.relative_to(common).as_posix() if d != common else d.name for d in dirs]
    return [n or d.name for n, d in zip(names, dirs)]


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def plot_runs(paths, out_dir, labels=None):
    """Draw every plot; returns the written paths (per-run λ and α plots, then the comparison)."""
    files = find_coefficient_files(paths)
    names = list(labels) if labels else run_names(files)
    if len(names) != len(files):
        raise DataError(f"{len(names)} labels given for {len(files)} {FILENAME} files: {[str(f) for f in files]}")
    if len(set(names)) != len(names):
        raise DataError(f"run names are not unique: {names}")
    out_dir = Path(out_dir)
    written, comparison = [], {}
    for f, name in zip(files, names):
        lam, alpha = load_coefficients(f)
        try:
            if lam:  # Setup 1 (no task vector) has an empty λ table: α only
                written.append(plot_lambdas(lam, out_dir / f"{_safe(name)}_lambda.png", title=f"λ per merge group: {name}"))
                comparison[name] = lam
            if alpha is not None:
                written.append(plot_layer_weights(alpha, out_dir / f"{_safe(name)}_alpha.png",
                                                  title=f"Layer weights α: {name}"))
        except DataError as e:
            raise DataError(f"{f}: {e}") from e
    if comparison:
        written.append(plot_lambda_comparison(comparison, out_dir / "lambda_comparison.png",
                                              title="λ per merge group"))
    return written


def _one_file(path):
    """The single coefficients.json named by ``path`` (a file or a run folder); None when it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    files = find_coefficient_files([path])
    if len(files) != 1:
        raise DataError(f"{path}: expected one {FILENAME} (one run), found {len(files)}: {[str(f) for f in files]}")
    return files[0]


def _role_files(spec):
    """The coefficients.json files of one figure role: ``spec`` is one run (file or run folder) or a list of runs
    (its seeds); [] when none exists. Some seeds of a row but not all is an error naming the missing ones."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    files = [_one_file(p) for p in specs]
    missing = [str(p) for p, f in zip(specs, files) if f is None]
    if missing and len(missing) < len(specs):
        raise DataError(f"runs missing: {missing} (the other seeds of this row exist: draw them all or none)")
    return [f for f in files if f is not None]


def paper_figure(figure, runs, out_dir):
    """Draw the paper's ``figure`` ("figure2" / "figure3") from ``runs`` ({role: run}); a run is a
    coefficients.json or a run folder, or a list of them (one per seed): the line is then their mean, with a band
    from their minimum to their maximum per group.

    Returns ``(path or None, plotted, missing)``: ``plotted`` is ``{line label: y-data as drawn}`` (and
    ``{label + " band": [low, high]}``, see ``lobes.plots.plot_lambda_lines``), ``missing`` the roles whose run does
    not exist (their lines are left out; nothing is drawn when no run exists). A run that exists but lacks the λ
    vector its line needs is an error naming the file.
    """
    filename, title, roles, lines = FIGURES[figure]
    unknown = set(runs) - set(roles)
    if unknown:
        raise DataError(f"{figure}: unknown run role(s) {sorted(unknown)}; expected {list(roles)}")
    files = {role: _role_files(runs[role]) if runs.get(role) is not None else [] for role in roles}
    missing = [role for role in roles if not files[role]]
    series, bands = {}, {}
    for role, vector, label in lines:
        stacked = []
        for f in files[role]:
            lam, _ = load_coefficients(f)
            if not lam or vector not in lam:
                raise DataError(f"{f}: {figure} needs λ of the '{vector}' vector (run '{role}'), found {sorted(lam or {})}")
            stacked.append(lam[vector])
        if not stacked:
            continue
        if len({len(v) for v in stacked}) != 1:
            raise DataError(f"{figure}: the runs of '{role}' have different numbers of merge groups: "
                            f"{[str(f) for f in files[role]]}")
        arr = np.asarray(stacked, dtype=np.float64)
        series[label] = stacked[0] if len(stacked) == 1 else arr.mean(axis=0)
        if len(stacked) > 1:
            bands[label] = (arr.min(axis=0), arr.max(axis=0))
    if not series:
        return None, {}, missing
    n_runs = sorted({len(f) for f in files.values() if f})
    if n_runs != [1]:
        title = f"{title}\nmean of {'/'.join(map(str, n_runs))} seeds; band: min–max over seeds"
    try:
        path, plotted = plot_lambda_lines(series, Path(out_dir) / filename, title=title, bands=bands)
    except DataError as e:
        raise DataError(f"{figure} from {[str(f) for fs in files.values() for f in fs]}: {e}") from e
    return path, plotted, missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help=f"experiment folders (searched recursively) or {FILENAME} files")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--labels", nargs="+", help="run names, one per found file (default: relative folders)")
    for figure, (_, title, roles, _) in FIGURES.items():
        parser.add_argument(f"--{figure}", nargs=len(roles), metavar=tuple(r.upper() for r in roles),
                            help=f"{title}: one run (folder or {FILENAME}) per role")
    parser.add_argument("--seeds", nargs="+", default=None,
                        help="the figures' runs are row folders: draw each as the mean over <row>/<seed> of these "
                             "seeds, with a min–max band")
    args = parser.parse_args(argv)
    if not args.paths and not any(getattr(args, f) for f in FIGURES):
        parser.error("give experiment folders and/or --figure2 / --figure3")
    try:
        written = plot_runs(args.paths, args.out, args.labels) if args.paths else []
        for figure, (_, _, roles, _) in FIGURES.items():
            if getattr(args, figure):
                given = getattr(args, figure)
                if args.seeds:
                    given = [[Path(row) / seed for seed in args.seeds] for row in given]
                path, _, missing = paper_figure(figure, dict(zip(roles, given)), args.out)
                if missing:
                    print(f"{figure}: no run for {missing} ({'left out' if path else 'figure not drawn'})",
                          file=sys.stderr)
                if path:
                    written.append(path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
