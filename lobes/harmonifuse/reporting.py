"""What a HarmoniFuse test writes: SER scored from generated words, WER per LibriSpeech split, the fusion weights.

A generated SER output that is not exactly one of the class names (``emotion_classes``) is "invalid"
(:data:`INVALID`, the column after the classes): a miss of its true class, never a class of its own
(:func:`ser_report_with_invalid`). Files: metrics.json (written by the Brain), asr_predictions.csv /
ser_predictions.csv (:func:`write_predictions`), fusion_weights.json, encoder_layer_weights.png,
lm_fusion_weights.png (:func:`write_fusion_artifacts`) and confusion.png.
"""
import csv
import json

import torch

from lobes import distributed as D
from lobes import metrics as M
from lobes import plots
from lobes.collectors import ASRCollector, SERCollector
from lobes.io_utils import atomic_write

INVALID = "<invalid>"                         # column of generated SER outputs that are not a class name


def emotion_index(text, classes):
    """Generated text -> class index; anything but an exact class name (surrounding spaces aside) is invalid
    (index ``len(classes)``, the column after the classes; never a true label)."""
    text = text.strip()
    return classes.index(text) if text in classes else len(classes)


def ser_report_with_invalid(y_true, y_pred, n_classes, speakers=None, num_bootstraps=1000, seed=0):
    """``lobes.metrics.ser_report`` where ``y_pred`` may hold ``n_classes`` (= invalid output).

    Same keys and bootstrap sets as ``ser_report`` (identical numbers when nothing is invalid); adds
    ``n_invalid`` and ``accuracy_ci`` (WA); ``confusion`` is (K+1)x(K+1) (last row empty, last column =
    invalid), ``per_class_recall`` K values.
    """
    k = n_classes
    report = M.ser_report(y_true, y_pred, speakers=speakers, num_bootstraps=num_bootstraps, n_classes=k + 1,
                          seed=seed)  # UA, WA and their CIs are already right: the invalid row is empty
    for name in ("precision", "macro_f1", "accuracy"):
        def fn(labels, samples, name=name):
            return M.metrics_from_confusion(M.confusion_counts(labels, samples, k + 1), k)[name]
        report[name], report[f"{name}_ci"] = M.bootstrap_ci(y_true, y_pred, fn, num_bootstraps=num_bootstraps,
                                                            conditions=speakers, seed=seed)
    report["per_class_recall"] = report["per_class_recall"][:k]
    report["n_invalid"] = sum(1 for p in y_pred if p == k)
    return report


def validation_ser_stats(y_true, y_pred, n_classes):
    """UA / WA in % and the count of invalid outputs, for the validation log."""
    m = M.metrics_from_confusion(M.confusion_counts(y_true, y_pred, n_classes + 1), n_classes)
    n_inv = sum(p == n_classes for p in y_pred)
    return {"UA": round(100 * m["uar"], 2), "WA": round(100 * m["accuracy"], 2), "invalid": n_inv}


def ser_test_metrics(y_true, y_pred, classes, speakers, num_bootstraps, seed):
    """metrics.json entries of the SER test: ``test`` (report with CIs) and ``ua`` / ``wa`` / ``macro_f1``."""
    rep = ser_report_with_invalid(y_true, y_pred, len(classes), speakers, num_bootstraps=num_bootstraps, seed=seed)
    return {"test": {**rep, "classes": list(classes) + [INVALID]}, "ua": rep["uar"], "wa": rep["accuracy"],
            "macro_f1": rep["macro_f1"], "invalid_rate": rep["n_invalid"] / rep["n"]}


class GeneratedSERCollector(SERCollector):
    """SER outputs of a generative model: the class of the generated words (:func:`emotion_index`; ``len(classes)``
    when invalid) and the words themselves; no class probabilities."""

    def add_generated(self, ids, labels, texts, speakers):
        self.add(ids=ids, true=labels.view(-1).cpu().tolist(), pred=[emotion_index(t, self.classes) for t in texts],
                 text=list(texts), spk=speakers)

    def summary(self):
        return validation_ser_stats(self["true"], self["pred"], len(self.classes)) if len(self) else {}

    def report(self, num_bootstraps, seed, speaker_bootstrap):
        if not len(self):
            return {}
        return ser_test_metrics(self["true"], self["pred"], self.classes, self["spk"] if speaker_bootstrap else None,
                                num_bootstraps, seed)


def split_collector(tag, classes):
    """The collector of one evaluation split (a ``TaskSplit``): ASR references/hypotheses or generated SER."""
    name = f"{tag} outputs"
    return ASRCollector(name) if tag.task == "asr" else GeneratedSERCollector(classes, name)


def gather_by_split(losses, outputs, classes):
    """Each split's collector gathered in that split's single-process order, read from the gathered evaluation
    losses (``TaskLosses``: every evaluated utterance with its tag); in that order, and with an empty collector for
    a split this rank did not decode, so that every rank joins the same gathers."""
    return {tag: outputs.get(tag, split_collector(tag, classes)).gather(order)
            for tag, order in losses.split_orders().items()}


def asr_test_metrics(asr_by_split, num_bootstraps, seed):
    """metrics.json entries of the ASR test: ``wer`` (first split) and per split its WER, CI and details;
    ``asr_by_split``: ``{split: ASRCollector}`` (or any rows with ``ids`` / ``refs`` / ``hyps``)."""
    details = {split: M.wer_details(o["refs"], o["hyps"]) for split, o in asr_by_split.items()}
    for split, o in asr_by_split.items():
        details[split]["wer_ci"] = M.wer_ci(o["refs"], o["hyps"], num_bootstraps, seed=seed)[1]
        details[split]["wer_whisper_norm"] = M.wer_whisper_norm(o["refs"], o["hyps"])
    first = next(iter(details))  # libri_test_splits order: test-clean first
    out = {"wer": details[first]["wer"], "wer_split": first, "wer_by_split": details}
    for split, d in details.items():
        out[f"wer_{split.replace('test-', '')}"] = d["wer"]
        out[f"wer_{split.replace('test-', '')}_ci"] = d["wer_ci"]
    o = asr_by_split[first]
    out["asr_examples"] = [{"id": i, "ref": r, "hyp": x} for i, r, x in list(zip(o["ids"], o["refs"], o["hyps"]))[:5]]
    return out


def write_predictions(folder, asr_by_split, ser):
    """asr_predictions.csv (split, id, ref, hyp) from ``{split: ASRCollector}`` and ser_predictions.csv (id, true,
    pred, generated text) from a :class:`GeneratedSERCollector` (None or empty: no file)."""
    if asr_by_split:
        with atomic_write(folder / "asr_predictions.csv", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "id", "ref", "hyp"])
            for split, o in asr_by_split.items():
                for row in zip(o["ids"], o["refs"], o["hyps"]):
                    w.writerow([split, *row])
    if ser is not None and len(ser):
        names = list(ser.classes) + [INVALID]
        with atomic_write(folder / "ser_predictions.csv", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "true", "pred", "generated"])
            for i, t, p, text in zip(ser["ids"], ser["true"], ser["pred"], ser["text"]):
                w.writerow([i, names[t], names[p], text])


def top_layers(model, tasks):
    """For the validation log: per task, the encoder layer (1-based) with the largest fusion weight α^τ."""
    return {f"enc_top_layer_{t}": int(model.encoder_fusion.layer_weights(t).argmax()) + 1 for t in tasks}


def gather_fusion_stats(model):
    """DDP: sum the per-task dynamic LM-weight statistics (``_alpha_sum`` / ``_alpha_count``) over the ranks, so
    fusion_weights.json describes every test utterance, not only rank 0's share."""
    if D.is_distributed():
        for buf in (model._alpha_sum, model._alpha_count):
            torch.distributed.all_reduce(buf)


def fusion_description(model):
    fusion = model.encoder_fusion
    if hasattr(fusion, "layer") and not hasattr(fusion, "layer_logits"):
        return f"fixed layer {fusion.layer}"
    return f"gated (gate={fusion.gate})" if fusion.gate != "none" else "weighted sum (no gate)"


def write_fusion_artifacts(model, tasks, folder):
    """fusion_weights.json and the two per-task bar plots (encoder α^τ, mean dynamic LM weights on the test set)."""
    weights = {t: model.fusion_weights(t) for t in tasks}
    as_list = {k: {t: (w[k].tolist() if w[k] is not None else None) for t, w in weights.items()}
               for k in ("encoder", "encoder_gate", "lm_static", "lm_dynamic_mean")}
    first = 0 if getattr(model.encoder_fusion, "include_cnn", False) else 1
    data = {"tasks": tasks, "encoder_fusion": fusion_description(model), "lm_fusion": model.lm_fusion.mode,
            "lm_fusion_form": model.lm_fusion.form,
            "encoder_first_layer": first, **as_list,
            "lm_dynamic_count": {t: int(model._alpha_count[model.tasks.index(t)].item()) for t in tasks}}
    with atomic_write(folder / "fusion_weights.json") as f:
        json.dump(data, f, indent=2)
    plots.plot_layer_weights({t.upper(): as_list["encoder"][t] for t in tasks},
                             folder / "encoder_layer_weights.png", first_index=first,
                             title=f"Encoder layer weights α^τ per task — {data['encoder_fusion']}")
    lm = {t.upper(): v for t, v in as_list["lm_dynamic_mean"].items() if v is not None}
    if lm:
        plots.plot_layer_weights(lm, folder / "lm_fusion_weights.png", first_index=1,
                                 title=f"LM layer weights β (lm_fusion={data['lm_fusion']}, "
                                       f"{data['lm_fusion_form']}), mean over test utterances")
    return data
