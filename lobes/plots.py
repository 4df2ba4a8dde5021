"""Figures for the papers: confusion matrices, λ per merge group (AdaLTM Figures 2/3: ``plot_lambda_lines``) and
layer weights α; training curves (loss, task metric, learning rate per epoch) of a fine-tuning run.

Every figure is drawn on its own ``matplotlib.figure.Figure`` with an Agg canvas (no pyplot global state, no
display needed) at a fixed ``figsize`` x ``dpi``, so a PNG is exactly ``figsize[0]*dpi`` x ``figsize[1]*dpi``
pixels, and saved atomically (temp file in the target folder, then rename).
Group axis convention (``lobes.adaltm.layer_groups``): group 0 = CNN feature extractor + positional embedding,
group l = transformer layer l. Layer-weight axis: index 0 = CNN output (when included), l = layer l.
"""
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lobes.errors import DataError
from lobes.io_utils import atomic_path

DEFAULT_DPI = 100
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _new_figure(figsize, dpi):
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi):
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (png when there is none)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)  # no bbox_inches="tight": keeps the pixel size fixed
    return path


def _values(seq, where):
    """A non-empty list of finite floats; DataError naming ``where`` otherwise."""
    try:
        arr = np.asarray(seq, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: expected a list of numbers ({e})") from e
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{where}: expected a non-empty 1-D list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{where}: contains NaN or inf")
    return arr


def _series(mapping, what):
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{what}: expected a non-empty {{name: [values]}} dict")
    return {str(k): _values(v, f"{what}['{k}']") for k, v in mapping.items()}


def plot_confusion(confusion, class_names, path, title=None, normalize=True, figsize=(7, 6), dpi=DEFAULT_DPI):
    """Confusion matrix heat map (rows = true class, columns = predicted class).

    Cell colour = row-normalised rate ``C[i, j] / sum_j C[i, j]`` (so the diagonal is per-class recall) when
    ``normalize``, raw counts otherwise; every cell is annotated with its count (and the rate).
    """
    c = np.asarray(confusion, dtype=np.float64)
    k = len(class_names)
    if c.shape != (k, k):
        raise DataError(f"confusion has shape {c.shape} but there are {k} class names")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise DataError("confusion: counts must be finite and non-negative")
    rows = c.sum(axis=1, keepdims=True)
    rate = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    shown = rate if normalize else c
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, c.max()))
    fig.colorbar(im, ax=ax, label="row-normalised rate" if normalize else "count")
    ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    for i in range(k):
        for j in range(k):
            text = f"{int(c[i, j])}\n{100 * rate[i, j]:.0f}%" if normalize else f"{int(c[i, j])}"
            dark = shown[i, j] > 0.6 * (1 if normalize else max(1.0, c.max()))
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _group_axis(ax, num_groups):
    ax.set_xlabel("Merge group (0 = CNN + pos. emb., l = Transformer layer l)")
    step = max(1, math.ceil(num_groups / 13))
    ax.set_xticks(range(0, num_groups, step))
    ax.set_xlim(-0.5, num_groups - 0.5)


def plot_lambdas(lambdas, path, title=None, init=0.5, figsize=(8, 4.5), dpi=DEFAULT_DPI):
    """λ per merge group, one line per task vector name (e.g. ``{"ASR": [25 floats], "SER": [25 floats]}``).

    A dashed horizontal line marks ``init`` (λ's initial value, 0.5 in the paper; None to omit).
    """
    series = _series(lambdas, "lambdas")
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, vals) in enumerate(series.items()):
        ax.plot(range(len(vals)), vals, marker=MARKERS[k % len(MARKERS)], markersize=4, label=f"λ {name}")
    if init is not None:
        ax.axhline(init, color="gray", linestyle="--", linewidth=0.8, label=f"init ({init:g})")
    _group_axis(ax, max(len(v) for v in series.values()))
    ax.set_ylabel("λ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_lambda_comparison(runs, path, title=None, init=0.5, figsize=(9, 5), dpi=DEFAULT_DPI):
    """Overlay λ of several runs (dual vs single vector, in- vs out-of-domain; Figures 2/3).

    ``runs``: ``{run name: {vector name: [λ per group]}}``. One colour per (run, vector) line; the line style
    encodes the run and the marker the vector name, so the same vector keeps its marker across runs.
    """
    if not isinstance(runs, dict) or not runs:
        raise DataError("runs: expected a non-empty {run name: {vector name: [values]}} dict")
    all_series = {str(run): _series(vecs, f"runs['{run}']") for run, vecs in runs.items()}
    vec_names = list(dict.fromkeys(v for s in all_series.values() for v in s))
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(sum(len(s) for s in all_series.values()))]
    n = 0
    for r, (run, series) in enumerate(all_series.items()):
        for name, vals in series.items():
            ax.plot(range(len(vals)), vals, color=colors[n], linestyle=LINESTYLES[r % len(LINESTYLES)],
                    marker=MARKERS[vec_names.index(name) % len(MARKERS)], markersize=4,
                    label=f"λ {name} ({run})")
            n += 1
    if init is not None:
        ax.axhline(init, color="gray", linestyle="--", linewidth=0.8)
    _group_axis(ax, max(len(v) for s in all_series.values() for v in s.values()))
    ax.set_ylabel("λ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_layer_weights(weights, path, title=None, first_index=0, figsize=(8, 4.5), dpi=DEFAULT_DPI):
    """Grouped bars of layer weights α (softmax over layers), one bar set per name.

    ``weights``: ``{name: [α per layer]}`` - the AdaLTM SER head's α (``{"SER": [...]}``) or HarmoniFuse's per-task
    encoder / LM fusion weights (``{"ASR": [...], "SER": [...]}``). Bar ``i`` sits at layer ``first_index + i``
    (0 when the CNN output is included, 1 when only transformer layers are weighted). A dotted line marks the
    uniform weight ``1 / num_layers`` of the longest set (what a zero-initialised softmax starts at).
    """
    series = _series(weights, "weights")
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    longest = max(len(v) for v in series.values())
    for k, (name, vals) in enumerate(series.items()):
        x = np.arange(len(vals)) + first_index - 0.4 + width * (k + 0.5)
        ax.bar(x, vals, width=width, label=f"α {name}")
    ax.axhline(1.0 / longest, color="gray", linestyle=":", linewidth=0.8, label="uniform")
    ax.set_xlabel("Layer (0 = CNN output)" if first_index == 0 else "Transformer layer")
    step = max(1, math.ceil(longest / 13))
    ax.set_xticks(range(first_index, first_index + longest, step))
    ax.set_ylabel("α")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _band_edges(poly, n):
    """(low, high) per x = 0..n-1 read back from a ``fill_between`` polygon."""
    xy = poly.get_paths()[0].vertices
    return np.array([[xy[np.isclose(xy[:, 0], x), 1].min(), xy[np.isclose(xy[:, 0], x), 1].max()]
                     for x in range(n)]).T


def plot_lambda_lines(lines, path, title=None, init=0.5, figsize=(8, 4.5), dpi=DEFAULT_DPI, bands=None):
    """λ per merge group as one line per entry of ``lines`` (``{label: [λ per group]}``, drawing order kept).

    The paper's Figures 2 and 3 in their colour order: the first line blue, then orange, green, red (matplotlib's
    C0..C3). Every line must have the same number of groups. ``bands`` (``{label: (low, high)}``, e.g. the range
    over seeds around their mean) shades a band in the line's colour. Returns ``(path, plotted)``: ``plotted`` is
    ``{label: y-data}`` read back from the drawn ``Line2D`` objects, plus ``{label + " band": [low, high]}`` read
    back from each band, so a caller (or a test) can check what the figure shows against what it was given.
    """
    series = _series(lines, "lines")
    lengths = {name: len(v) for name, v in series.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"lines: every λ line needs the same number of merge groups, got {lengths}")
    bands = bands or {}
    if set(bands) - set(series):
        raise DataError(f"bands: no line named {sorted(set(bands) - set(series))}")
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    drawn, shaded = {}, {}
    for k, (name, vals) in enumerate(series.items()):
        (line,) = ax.plot(range(len(vals)), vals, color=f"C{k % 10}", marker=MARKERS[k % len(MARKERS)],
                          markersize=4, label=name)
        drawn[name] = line
        if name in bands:
            low, high = (_values(b, f"bands['{name}']") for b in bands[name])
            if not len(low) == len(high) == len(vals):
                raise DataError(f"bands['{name}']: low / high need {len(vals)} values, got {len(low)} / {len(high)}")
            shaded[name] = ax.fill_between(range(len(vals)), low, high, color=f"C{k % 10}", alpha=0.2, linewidth=0)
    if init is not None:
        ax.axhline(init, color="gray", linestyle="--", linewidth=0.8, label=f"init ({init:g})")
    _group_axis(ax, next(iter(lengths.values())))
    ax.set_ylabel("λ")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    plotted = {name: np.asarray(line.get_ydata(), dtype=np.float64) for name, line in drawn.items()}
    plotted.update({f"{name} band": _band_edges(poly, len(series[name])) for name, poly in shaded.items()})
    return _save(fig, path, dpi), plotted


def _read_train_log(path):
    """Per-epoch values of a SpeechBrain ``train_log.txt`` (``epoch: 3, lr: 1e-3 - train loss: 2.1 - valid loss:
    2.0, valid WER: 45``) as ``{epoch: {"lr": .., "train loss": .., "valid WER": ..}}``; a resumed run's repeated
    epoch keeps its last line; test lines (``Epoch loaded: ...``) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no training log")
    epochs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("epoch: "):
            continue
        values = {}
        for part in line.split(" - "):
            for item in part.split(", "):
                key, _, val = item.rpartition(": ")
                try:
                    values[key] = float(val)
                except ValueError:
                    continue
        if "epoch" in values:
            epochs[int(values.pop("epoch"))] = values
    if not epochs:
        raise DataError(f"{path}: no epoch lines")
    return dict(sorted(epochs.items()))


def plot_training_curves(train_log, path, title=None, figsize=(12, 4), dpi=DEFAULT_DPI):
    """Training curves from ``train_log.txt``: train / valid loss per epoch, the validation task metrics (WER,
    UAR, MaF1, ... every other ``valid`` value but its time) and, when logged, the learning rates."""
    epochs = _read_train_log(train_log)
    keys = list(dict.fromkeys(k for v in epochs.values() for k in v))
    panels = [("loss", [k for k in ("train loss", "valid loss") if k in keys])]
    panels.append(("metric", [k for k in keys if k.startswith("valid ") and k not in ("valid loss", "valid time_s")]))
    panels.append(("learning rate", [k for k in keys if k.startswith("lr")]))
    panels = [(name, ks) for name, ks in panels if ks]
    fig = _new_figure(figsize, dpi)
    for i, (name, ks) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, k in enumerate(ks):
            xs = [e for e, v in epochs.items() if k in v]
            ax.plot(xs, [epochs[e][k] for e in xs], marker=MARKERS[j % len(MARKERS)], markersize=4, label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi)
