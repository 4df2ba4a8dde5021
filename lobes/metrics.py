"""Evaluation metrics for categorical SER and ASR, with bootstrap confidence intervals.

All SER metrics are fractions in [0, 1] computed from the confusion matrix ``C`` (rows = true class, columns =
predicted class, ``C[i, j]`` = number of utterances of class ``i`` predicted as ``j``). With ``tp_c = C[c, c]``,
``n_c = sum_j C[c, j]`` (support) and ``p_c = sum_i C[i, c]`` (times predicted):

* ``uar`` (unweighted average recall, the paper's primary metric)
      UAR = mean_{c in T} tp_c / n_c,      T = classes present in y_true.
  Classes absent from y_true have no defined recall and are left out of the mean (same as
  ``sklearn.metrics.balanced_accuracy_score``); on MSP-Podcast Test1 every class is present, so T = all 8.
* ``precision`` (macro precision, "Pre." in Table 1)
      Pre = mean_{c in U} prec_c,   prec_c = tp_c / p_c  (0 when p_c = 0),   U = classes in y_true OR y_pred.
  A class that occurs but is never predicted therefore counts as precision 0 (sklearn ``zero_division=0`` with
  ``labels=sorted(U)``); a class that appears nowhere is ignored.
* ``macro_f1`` ("MaF1")
      MaF1 = mean_{c in U} F1_c,   F1_c = 2 prec_c rec_c / (prec_c + rec_c) = 2 tp_c / (n_c + p_c)  (0 when tp_c = 0).
  This is the mean of per-class F1, not the F1 of macro precision and macro recall.
* ``accuracy`` (weighted accuracy, WA) = sum_c tp_c / N.

Confidence intervals come from a percentile bootstrap (the ``confidence-intervals`` package of Ferrer & Riera, the
toolkit the paper cites): draw ``B`` resampled test sets, recompute the metric on each, and report the
``alpha/2`` and ``100 - alpha/2`` percentiles. With ``conditions`` (speaker ids) whole speakers are resampled
first and utterances within each selected speaker second, so the interval accounts for speaker correlation.
"""
import json
import warnings

import numpy as np

from lobes.errors import DataError
from lobes.results_io import read_metrics, write_metrics  # noqa: F401 -- metrics.json, where tools look for it

try:  # the package the paper cites; without it the same numbers come from numpy (see bootstrap_sets)
    from confidence_intervals import get_bootstrap_indices as _ci_bootstrap_indices
    from confidence_intervals import get_conf_int as _ci_conf_int
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _ci_bootstrap_indices = None
    _ci_conf_int = None

# Speaker ids that do not identify a speaker (MSP-Podcast SpkrID may be "Unknown"): each such utterance is its own
# bootstrap condition rather than all of them being lumped into one giant fake speaker.
UNKNOWN_SPEAKERS = {"", "unknown", "none", "nan"}

SER_CI_METRICS = ("uar", "precision", "macro_f1")


# ----------------------------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------------------------
def _as_labels(values, name, n_classes):
    """Integer class indices in [0, n_classes) as an int64 array; DataError naming ``name`` otherwise."""
    try:
        arr = np.asarray(values)
    except Exception as e:  # ragged input and the like
        raise DataError(f"{name}: cannot read class indices ({e})") from e
    if arr.ndim != 1:
        raise DataError(f"{name}: expected a 1-D sequence of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise DataError(f"{name}: class indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= n_classes)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name}[{i}] = {arr[i]} is not a class index in [0, {n_classes})")
    return arr


def _check_pair(y_true, y_pred, n_classes):
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise DataError(f"n_classes must be a positive integer, got {n_classes!r}")
    t = _as_labels(y_true, "y_true", n_classes)
    p = _as_labels(y_pred, "y_pred", n_classes)
    if len(t) != len(p):
        raise DataError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    if len(t) == 0:
        raise DataError("y_true is empty: no utterances to score")
    return t, p


# ----------------------------------------------------------------------------------------------------------------
# Point metrics
# ----------------------------------------------------------------------------------------------------------------
def confusion_counts(y_true, y_pred, n_classes):
    """``n_classes x n_classes`` int confusion matrix, rows = true class (one ``bincount``: fast inside bootstraps)."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(confusion, n_classes=None):
    """UAR, macro precision, macro F1 and accuracy from a confusion matrix, exactly as defined in the module doc.

    Returns a dict of floats. Used inside the bootstrap loops (numpy only, no sklearn overhead); ``ser_metrics``
    computes the reported values with sklearn and the tests check both agree. ``n_classes`` < the matrix size:
    the columns after the first ``n_classes`` are outputs that are no class (e.g. a generated word outside the
    label set): misses of their true class, but not classes that precision and F1 average over.
    """
    c = np.asarray(confusion, dtype=np.float64)
    k = c.shape[0] if n_classes is None else n_classes
    tp = np.diag(c)[:k]
    n_true = c[:k].sum(axis=1)
    n_pred = c[:, :k].sum(axis=0)
    total = c.sum()
    in_true = n_true > 0
    in_any = in_true | (n_pred > 0)
    recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=in_true)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros_like(tp), where=in_any)
    return {
        "uar": float(recall[in_true].mean()) if in_true.any() else float("nan"),
        "precision": float(precision[in_any].mean()) if in_any.any() else float("nan"),
        "macro_f1": float(f1[in_any].mean()) if in_any.any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
    }


def _metric_fn(name, n_classes):
    """``metric(labels, samples)`` for one of ``metrics_from_confusion``'s keys, in the bootstrap package's order."""

    def fn(labels, samples):
        return metrics_from_confusion(confusion_counts(labels, samples, n_classes))[name]

    fn.__name__ = name
    return fn


def uar_fn(n_classes=8):
    """``metric(labels, samples) -> UAR`` for ``bootstrap_ci``."""
    return _metric_fn("uar", n_classes)


def precision_fn(n_classes=8):
    """``metric(labels, samples) -> macro precision`` for ``bootstrap_ci``."""
    return _metric_fn("precision", n_classes)


def macro_f1_fn(n_classes=8):
    """``metric(labels, samples) -> macro F1`` for ``bootstrap_ci``."""
    return _metric_fn("macro_f1", n_classes)


def ser_metrics(y_true, y_pred, n_classes=8):
    """Categorical SER metrics (fractions in [0, 1]) of integer class predictions.

    Returns ``{"uar", "precision", "macro_f1", "accuracy", "per_class_recall", "confusion", "n"}``:
    ``per_class_recall[c] = tp_c / n_c`` or ``None`` when class ``c`` is absent from y_true (JSON has no NaN);
    ``confusion`` is a ``n_classes x n_classes`` list of int lists, rows = true class; ``n`` = number of utterances.
    Definitions (which classes enter each macro average) are in the module docstring.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
    from sklearn.metrics import precision_recall_fscore_support

    t, p = _check_pair(y_true, y_pred, n_classes)
    present = sorted(set(t.tolist()) | set(p.tolist()))  # U: classes in y_true or y_pred
    # balanced_accuracy_score drops classes absent from y_true, warning "y_pred contains classes not in y_true".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        uar = balanced_accuracy_score(t, p)
    prec, _, f1, _ = precision_recall_fscore_support(t, p, labels=present, average=None, zero_division=0)
    confusion = confusion_matrix(t, p, labels=list(range(n_classes)))
    support = confusion.sum(axis=1)
    per_class_recall = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(n_classes)]
    return {
        "uar": float(uar),
        "precision": float(np.mean(prec)),
        "macro_f1": float(np.mean(f1)),
        "accuracy": float(accuracy_score(t, p)),
        "per_class_recall": per_class_recall,
        "confusion": confusion.astype(int).tolist(),
        "n": int(len(t)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------------
def speaker_conditions(speakers):
    """Map speaker ids to the integer condition array the bootstrap package expects.

    Known speakers get one integer each (in sorted order of their ids); every utterance whose id is in
    ``UNKNOWN_SPEAKERS`` (case-insensitive) or is None gets its own condition, so unknown speakers are resampled
    like independent utterances.
    """
    ids = ["" if s is None else str(s) for s in speakers]
    known = sorted({s for s in ids if s.strip().lower() not in UNKNOWN_SPEAKERS})
    index = {s: i for i, s in enumerate(known)}
    out = np.empty(len(ids), dtype=np.int64)
    next_id = len(known)
    for i, s in enumerate(ids):
        if s in index:
            out[i] = index[s]
        else:
            out[i] = next_id
            next_id += 1
    return out


class _ConditionGroups:
    """Utterance positions of each condition, grouped once (the package recomputes ``conditions == s`` per draw)."""

    def __init__(self, conditions):
        conditions = np.asarray(conditions)
        self.unique, inverse = np.unique(conditions, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # positions ascending within each condition
        sizes = np.bincount(inverse, minlength=len(self.unique))
        self.members = np.split(order, np.cumsum(sizes)[:-1])
        self.rng = np.random.RandomState(0)


def _condition_indices(groups, random_state):
    """One speaker-level bootstrap set, bit-identical to ``confidence_intervals.get_bootstrap_indices(n, conditions,
    random_state)`` (a test checks this) but ~50x faster: the package calls ``sklearn.utils.resample`` once per
    selected speaker, whose parameter validation dominates (about 0.13 s per set for 46k utterances / 300 speakers).

    Scheme (the package's): draw ``S`` speakers with replacement from the ``S`` speakers; for each distinct drawn
    speaker (ascending id) drawn ``k`` times, draw its ``m`` utterances with replacement and repeat each draw ``k``
    times. Like the package (and ``sklearn.utils.resample`` with an int seed) every draw uses a fresh
    ``RandomState(random_state)``, so the within-speaker draw depends only on ``m``: cached per size.
    """
    rs = groups.rng  # re-seeding one generator is 10x cheaper than building a RandomState per draw
    n_cond = len(groups.unique)
    rs.seed(random_state)
    picked = rs.choice(n_cond, size=n_cond, replace=True)
    picked, counts = np.unique(picked, return_counts=True)
    draws = {}
    parts = []
    for g, k in zip(picked, counts):
        members = groups.members[g]
        m = len(members)
        if m not in draws:
            rs.seed(random_state)
            draws[m] = rs.choice(m, size=m, replace=True)
        parts.append(np.repeat(members[draws[m]], k))
    return np.concatenate(parts)


def _utterance_indices(n, random_state):
    """One utterance-level bootstrap set: the package's ``get_bootstrap_indices(n, None, random_state)``, or the same
    numbers without it (``sklearn.utils.resample`` with an int seed is ``RandomState(seed).choice(n, n)``)."""
    if _ci_bootstrap_indices is not None:
        return np.asarray(_ci_bootstrap_indices(n, None, random_state=random_state))
    return np.random.RandomState(random_state).choice(n, size=n, replace=True)


def bootstrap_sets(n, conditions=None, num_bootstraps=1000, seed=0):
    """Yield ``num_bootstraps`` index arrays, each one resampled test set of the ``n`` utterances.

    Set ``b`` equals ``confidence_intervals.get_bootstrap_indices(n, conditions, random_state=seed *
    num_bootstraps + b)``. The package itself has no seed argument: it uses ``random_state=b`` for set ``b`` (and
    never touches numpy's global RNG), so ``seed=0`` reproduces ``evaluate_with_conf_int`` exactly and every seed is
    reproducible, other seeds giving disjoint streams. Speaker-level sets come from ``_condition_indices``.
    """
    if num_bootstraps < 1:
        raise DataError(f"num_bootstraps must be >= 1, got {num_bootstraps}")
    if n < 1:
        raise DataError("cannot bootstrap an empty test set")
    offset = int(seed) * int(num_bootstraps)
    if offset < 0 or offset + num_bootstraps > 2**32:
        raise DataError(f"seed {seed} out of range for {num_bootstraps} bootstraps (random states must be < 2**32)")
    groups = None
    if conditions is not None:
        if len(conditions) != n:
            raise DataError(f"conditions has {len(conditions)} entries but there are {n} utterances")
        groups = _ConditionGroups(conditions)
    for b in range(num_bootstraps):
        if groups is None:
            yield _utterance_indices(n, offset + b)
        else:
            yield _condition_indices(groups, offset + b)


def _percentile_ci(values, alpha):
    """(alpha/2, 100-alpha/2) percentiles of the bootstrap values (the package's ``get_conf_int``)."""
    if not 0 < alpha < 100:
        raise DataError(f"alpha must be in (0, 100) percent, got {alpha}")
    values = np.asarray(values, dtype=np.float64)
    if _ci_conf_int is not None:
        low, high = _ci_conf_int(values, alpha)
    else:
        low, high = np.percentile(values, alpha / 2), np.percentile(values, 100 - alpha / 2)
    return float(low), float(high)


def _conditions_from(conditions, n):
    if conditions is None:
        return None
    conditions = np.asarray(conditions)
    if conditions.dtype.kind not in "iu":  # speaker id strings -> integers, as the package needs
        conditions = speaker_conditions(conditions.tolist())
    if len(conditions) != n:
        raise DataError(f"conditions has {len(conditions)} entries but there are {n} utterances")
    return conditions


def bootstrap_ci(y_true, y_pred, metric_fn, num_bootstraps=1000, alpha=5, conditions=None, seed=0):
    """Point value and percentile-bootstrap ``(low, high)`` interval of ``metric_fn(y_true, y_pred)``.

    ``metric_fn(labels, samples)`` follows ``confidence_intervals.evaluate_with_conf_int``'s argument order.
    ``conditions``: per-utterance speaker ids (strings or ints) for a speaker-level bootstrap (see
    ``speaker_conditions``). The interval is ``[P_{alpha/2}, P_{100-alpha/2}]`` of the metric over the resampled
    sets (95% for ``alpha=5``). Deterministic for a given ``seed`` (see ``bootstrap_sets``).
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if len(t) != len(p):
        raise DataError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    if len(t) == 0:
        raise DataError("y_true is empty: no utterances to score")
    cond = _conditions_from(conditions, len(t))
    value = float(metric_fn(t, p))
    vals = [metric_fn(t[idx], p[idx]) for idx in bootstrap_sets(len(t), cond, num_bootstraps, seed)]
    return value, _percentile_ci(vals, alpha)


def ser_report(y_true, y_pred, speakers=None, num_bootstraps=1000, n_classes=8, alpha=5, seed=0):
    """``ser_metrics`` plus ``{metric}_ci: [low, high]`` for uar, precision and macro_f1.

    All three intervals come from the same resampled sets (one pass; the confusion matrix of each set gives every
    metric), which is identical to calling ``bootstrap_ci`` once per metric with the same seed. ``speakers``:
    optional per-utterance speaker ids for a speaker-level bootstrap.
    """
    out = ser_metrics(y_true, y_pred, n_classes)
    t, p = _check_pair(y_true, y_pred, n_classes)
    cond = _conditions_from(speakers, len(t))
    vals = {k: [] for k in SER_CI_METRICS}
    for idx in bootstrap_sets(len(t), cond, num_bootstraps, seed):
        m = metrics_from_confusion(confusion_counts(t[idx], p[idx], n_classes))
        for k in SER_CI_METRICS:
            vals[k].append(m[k])
    for k in SER_CI_METRICS:
        out[f"{k}_ci"] = list(_percentile_ci(vals[k], alpha))
    out["num_bootstraps"] = int(num_bootstraps)
    out["ci_level"] = (100 - alpha) / 100
    out["ci_unit"] = "speaker" if cond is not None else "utterance"
    return out


# ----------------------------------------------------------------------------------------------------------------
# ASR
# ----------------------------------------------------------------------------------------------------------------
def _check_transcripts(refs, hyps):
    if isinstance(refs, str) or isinstance(hyps, str):
        raise DataError("refs and hyps must be lists of transcripts, not single strings")
    refs, hyps = list(refs), list(hyps)
    if len(refs) == 0:
        raise DataError("refs is empty: no transcripts to score")
    if len(refs) != len(hyps):
        raise DataError(f"refs has {len(refs)} transcripts but hyps has {len(hyps)}")
    for name, seq in (("refs", refs), ("hyps", hyps)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise DataError(f"{name}[{i}] is {type(s).__name__}, expected a transcript string")
    if sum(len(r.split()) for r in refs) == 0:
        raise DataError("refs contain no words: WER is undefined")
    return refs, hyps


def wer_details(refs, hyps):
    """Corpus-level word error counts via jiwer: ``{"wer", "substitutions", "deletions", "insertions", "hits",
    "n_ref_words", "n_utts"}`` with ``wer = (S + D + I) / N`` (N = total reference words, i.e. pooled over
    utterances, not a mean of per-utterance WERs). Words are whitespace-separated tokens; normalise the text first
    (``lobes.ctc_text.normalize_transcript``) - this function compares strings as given. Empty reference strings
    are allowed (their hypothesis words count as insertions) as long as the corpus has at least one word.
    """
    import jiwer

    refs, hyps = _check_transcripts(refs, hyps)
    out = jiwer.process_words(refs, hyps)
    s, d, i, h = out.substitutions, out.deletions, out.insertions, out.hits
    n = s + d + h
    return {
        "wer": (s + d + i) / n,
        "substitutions": int(s),
        "deletions": int(d),
        "insertions": int(i),
        "hits": int(h),
        "n_ref_words": int(n),
        "n_utts": len(refs),
    }


def wer(refs, hyps):
    """Corpus WER as a fraction (can exceed 1 with many insertions); see ``wer_details``."""
    return wer_details(refs, hyps)["wer"]


def wer_ci(refs, hyps, num_bootstraps=1000, alpha=5, seed=0, conditions=None):
    """Corpus WER and its percentile-bootstrap ``[low, high]`` interval over utterances.

    Each resampled test set's WER is Σ errors / Σ reference words of the drawn utterances (pooled, as the point
    value), over the same sets as the SER intervals (``bootstrap_sets``: same ``seed`` and ``num_bootstraps``
    give the same draws). ``conditions``: per-utterance speaker ids for a speaker-level bootstrap. A draw made only
    of empty references has no WER and is skipped.
    """
    import jiwer

    refs, hyps = _check_transcripts(refs, hyps)
    errors, words = np.zeros(len(refs)), np.zeros(len(refs))
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not r.split():  # jiwer refuses an empty reference: every hypothesis word is an insertion
            errors[i] = len(h.split())
            continue
        o = jiwer.process_words(r, h)
        errors[i] = o.substitutions + o.deletions + o.insertions
        words[i] = o.hits + o.substitutions + o.deletions
    cond = _conditions_from(conditions, len(refs))
    vals = [errors[idx].sum() / words[idx].sum()
            for idx in bootstrap_sets(len(refs), cond, num_bootstraps, seed) if words[idx].sum() > 0]
    return float(errors.sum() / words.sum()), list(_percentile_ci(vals, alpha))


def whisper_normalizer(spelling_mapping=None):
    """Whisper's English text normaliser (``transformers``' ``EnglishTextNormalizer``, the one ASR papers report
    WER with): lower case, bracketed/filler words removed (``[laughter]``, "uh", "um"), contractions expanded,
    titles spelled ("mr" -> "mister"), spelled-out numbers written as digits ("nineteen ninety" -> "1990",
    "fifty percent" -> "50%"), punctuation and accents removed.

    ``spelling_mapping``: British -> American spellings. transformers does not ship the table: it comes with each
    Whisper tokenizer as ``normalizer.json`` (hub download). ``None`` (default) uses an empty mapping, so
    "colour" vs "color" counts as an error; pass a dict, or the path of a ``normalizer.json`` you have locally,
    to match Whisper's numbers exactly.
    """
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    if spelling_mapping is None:
        spelling_mapping = {}
    elif not isinstance(spelling_mapping, dict):
        path = spelling_mapping
        try:
            with open(path, encoding="utf-8") as f:
                spelling_mapping = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the English spelling mapping ({e})") from e
        if not isinstance(spelling_mapping, dict):
            raise DataError(f"{path}: English spelling mapping must be a JSON object")
    return EnglishTextNormalizer(spelling_mapping)


def wer_whisper_norm_details(refs, hyps, spelling_mapping=None):
    """``wer_details`` after Whisper's English normaliser on both sides (see ``whisper_normalizer``)."""
    refs, hyps = _check_transcripts(refs, hyps)
    norm = whisper_normalizer(spelling_mapping)
    return wer_details([norm(r) for r in refs], [norm(h) for h in hyps])


def wer_whisper_norm(refs, hyps, spelling_mapping=None):
    """Corpus WER (fraction) with Whisper's English normaliser applied to refs and hyps. Raw or CTC-normalised
    text both work (the normaliser lower-cases and maps spelled numbers to digits on each side)."""
    return wer_whisper_norm_details(refs, hyps, spelling_mapping)["wer"]
