"""Is system B really better than system A? Paired tests on the same test utterances, Holm's correction, and the
Student-t aggregation over repeated runs (seeds, folds).

Paired comparisons (``compare_ser``, ``compare_wer``) score two systems on the utterances both scored and report
Δ = metric(B) − metric(A) with

* a **paired bootstrap** percentile interval: ``scipy.stats.bootstrap`` resamples utterance indices, and the
  statistic recomputes both systems' metric on the same resampled set (so the pairing is kept);
* an **approximate-randomisation p-value**: ``scipy.stats.permutation_test`` with ``permutation_type="samples"``
  swaps A's and B's output of each utterance at random (two-sided; exact enumeration of all 2^n swaps when
  ``num_permutations >= 2^n``). Under H0 "A and B are exchangeable on every utterance" this is exact.

UAR and MaF1 are corpus-level (macro averages over the confusion matrix, ``lobes.metrics`` definitions), so neither
test works on per-utterance scores: both recompute the metric on each resampled / swapped set.

WER: a matched-pair **sign-flip test** on the per-utterance error counts e_i (S + D + I, jiwer). Swapping A and B on
utterance i flips the sign of d_i = e_B,i − e_A,i, and the statistic is ΔWER = Σ d_i / Σ words_i, the difference of
the pooled WERs the table reports. We chose it over ``scipy.stats.wilcoxon``: Wilcoxon ranks |d_i| (many ties and
zeros for integer counts) and tests a shift of the median per-utterance difference, which weights a 3-word and a
30-word utterance alike and need not agree in sign with ΔWER.

Several runs (seeds) of both systems: the runs are paired by name (seed s of A with seed s of B) and the units are
(run, utterance); the metric is pooled over the units. The bootstrap resamples utterances with all their runs
(the runs of one utterance are correlated); the permutation swaps each unit on its own.

``holm`` adjusts the p-values of one table's comparisons (Holm–Bonferroni; scipy's ``false_discovery_control`` is
Benjamini–Hochberg, and statsmodels is not a dependency). ``t_interval`` is the mean ± Student-t interval over
repeated units (seeds of one row, folds of IEMOCAP).
"""
import math

import numpy as np

from lobes.errors import DataError

SER_COMPARED = ("uar", "macro_f1")


# ----------------------------------------------------------------------------------------------------------------
# Metrics over batches of resampled sets
# ----------------------------------------------------------------------------------------------------------------
def batch_ser_metrics(y_true, y_pred, n_classes):
    """``{"uar", "precision", "macro_f1"}`` arrays over the leading axes of ``y_true`` / ``y_pred`` (shape
    ``(..., m)``), each entry = ``lobes.metrics.metrics_from_confusion`` of that set (a test checks they agree)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    t, p = np.broadcast_arrays(t, p)
    lead = t.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    k2 = n_classes * n_classes
    flat = (np.arange(rows).reshape(*lead, 1) * k2 + t * n_classes + p).ravel()
    c = np.bincount(flat, minlength=rows * k2).reshape(*lead, n_classes, n_classes).astype(np.float64)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    n_true, n_pred = c.sum(axis=-1), c.sum(axis=-2)
    in_true, in_any = n_true > 0, (n_true + n_pred) > 0
    recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=in_true)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros_like(tp), where=in_any)
    return {"uar": recall.sum(-1) / in_true.sum(-1),
            "precision": precision.sum(-1) / in_any.sum(-1),
            "macro_f1": f1.sum(-1) / in_any.sum(-1)}


def utterance_errors(refs, hyps):
    """Per-utterance word errors (S + D + I) and reference word counts, as float arrays (jiwer alignment; an empty
    reference counts every hypothesis word as an insertion, as ``lobes.metrics.wer_ci`` does)."""
    import jiwer

    errors, words = np.zeros(len(refs)), np.zeros(len(refs))
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not r.split():
            errors[i] = len(h.split())
            continue
        o = jiwer.process_words(r, h)
        errors[i] = o.substitutions + o.deletions + o.insertions
        words[i] = o.hits + o.substitutions + o.deletions
    return errors, words


# ----------------------------------------------------------------------------------------------------------------
# The paired bootstrap and the permutation test
# ----------------------------------------------------------------------------------------------------------------
def _batch_size(units, budget=4_000_000):
    """Resampled sets per statistic call, so one call holds about ``budget`` unit indices."""
    return max(1, budget // max(1, units))


def paired_test(delta, aux, a, b, n_runs=1, num_bootstraps=1000, num_permutations=10000, confidence=0.95, seed=0):
    """Δ, its paired-bootstrap percentile interval and the two-sided permutation p-value of a statistic
    ``delta(aux, a, b)`` (arrays of shape ``(..., m)`` -> Δ of shape ``(...)``).

    ``aux`` (reference labels, word counts), ``a`` and ``b`` hold one entry per unit, run-major:
    unit ``r * n + i`` is utterance ``i`` of run ``r``. The bootstrap resamples the ``n`` utterances (each with
    all its runs); the permutation swaps ``a`` and ``b`` unit by unit. Deterministic for a given ``seed``.
    """
    from scipy.stats import bootstrap, permutation_test

    aux, a, b = (np.asarray(x) for x in (aux, a, b))
    if not aux.shape == a.shape == b.shape or aux.ndim != 1:
        raise DataError(f"paired test: aux, a, b must be 1-D and equal in length, got {aux.shape}, {a.shape}, "
                        f"{b.shape}")
    if len(a) == 0 or len(a) % n_runs:
        raise DataError(f"paired test: {len(a)} units are not {n_runs} runs of the same utterances")
    n = len(a) // n_runs
    offsets = np.arange(n_runs)[:, None] * n

    def resampled(idx, axis=-1):
        units = (offsets + idx[..., None, :]).reshape(*idx.shape[:-1], n_runs * n)
        return delta(aux[units], a[units], b[units])

    def swapped(x, y, axis=-1):
        return delta(np.broadcast_to(aux, x.shape), x, y)

    observed = float(delta(aux, a, b))
    if n < 2:  # one utterance: no resampling distribution
        return {"delta": observed, "ci": [observed, observed], "p": 1.0, "n": n, "n_runs": n_runs}
    boot = bootstrap((np.arange(n),), resampled, n_resamples=num_bootstraps, vectorized=True, method="percentile",
                     confidence_level=confidence, rng=np.random.default_rng(seed), batch=_batch_size(len(a)))
    perm = permutation_test((a, b), swapped, permutation_type="samples", vectorized=True,
                            n_resamples=num_permutations, rng=np.random.default_rng(seed),
                            batch=_batch_size(len(a)))
    low, high = boot.confidence_interval
    return {"delta": observed, "ci": [float(low), float(high)], "p": float(perm.pvalue), "n": n, "n_runs": n_runs}


def compare_ser(y_true, pred_a, pred_b, n_classes, metrics=SER_COMPARED, n_runs=1, **kw):
    """``{metric: {"a", "b", "delta", "ci", "p", "n", "n_runs"}}`` for B − A on class indices (run-major units,
    see ``paired_test``; ``kw``: num_bootstraps, num_permutations, confidence, seed)."""
    t, a, b = (np.asarray(x, dtype=np.int64) for x in (y_true, pred_a, pred_b))
    for name, arr in (("y_true", t), ("pred_a", a), ("pred_b", b)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise DataError(f"{name}: class indices must lie in [0, {n_classes})")
    out = {}
    for m in metrics:
        def delta(tt, x, y, m=m):
            return batch_ser_metrics(tt, y, n_classes)[m] - batch_ser_metrics(tt, x, n_classes)[m]

        res = paired_test(delta, t, a, b, n_runs=n_runs, **kw)
        out[m] = {"a": float(batch_ser_metrics(t, a, n_classes)[m]),
                  "b": float(batch_ser_metrics(t, b, n_classes)[m]), **res}
    return out


def compare_wer(words, errors_a, errors_b, n_runs=1, **kw):
    """``{"a", "b", "delta", "ci", "p", "n", "n_runs"}`` for WER(B) − WER(A) from per-unit error and word counts
    (``utterance_errors``); the p-value is the sign-flip test of the per-unit differences (module doc)."""
    w, ea, eb = (np.asarray(x, dtype=np.float64) for x in (words, errors_a, errors_b))
    if w.sum() <= 0:
        raise DataError("compare_wer: the references hold no words; WER is undefined")

    def delta(ww, x, y):
        return (y - x).sum(-1) / ww.sum(-1)

    res = paired_test(delta, w, ea, eb, n_runs=n_runs, **kw)
    return {"a": float(ea.sum() / w.sum()), "b": float(eb.sum() / w.sum()), **res}


# ----------------------------------------------------------------------------------------------------------------
# Multiple comparisons and repeated runs
# ----------------------------------------------------------------------------------------------------------------
def holm(pvalues):
    """Holm–Bonferroni adjusted p-values, in the input order: the k-th smallest of m is multiplied by m − k + 1,
    made non-decreasing in that order, and capped at 1. Reject H_i at level a when ``holm(p)[i] < a``."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise DataError(f"holm: expected a 1-D list of p-values in [0, 1], got {pvalues!r}")
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    out = np.empty_like(p)
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def t_interval(values, confidence=0.95):
    """``(mean, low, high, std)`` of repeated measurements (seeds, folds): the Student-t interval of the mean,
    ``mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation; low / high / std
    are None for n < 2 (no spread to estimate)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.all(np.isfinite(v)):
        raise DataError(f"t_interval: expected a non-empty list of finite numbers, got {values!r}")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None, None, None
    std = float(v.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, len(v) - 1)) * std / math.sqrt(len(v))
    return mean, mean - half, mean + half, std
