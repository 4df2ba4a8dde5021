"""Per-utterance outputs of one evaluation stage, one collector per task (or per task and split).

A Brain creates its collectors in ``on_stage_start``, appends each evaluation batch in ``compute_objectives``,
gathers them at the stage end (``ToolkitBrain.gather``: under DDP every rank's rows come back in single-process
order, checked to cover the evaluated set once) and reads validation statistics (``summary``) or test metrics
(``report``) from them. Writing metrics.json, predictions.csv and asr_predictions.csv are plain functions
(``lobes.metrics``, :func:`write_ser_predictions`, :func:`write_asr_predictions`).
"""
import csv
from pathlib import Path

import torch

from lobes import distributed as D
from lobes import metrics as M
from lobes.io_utils import atomic_write


class Collector:
    """Rows keyed by utterance id: one list per column, appended batch by batch."""

    columns = ("ids",)

    def __init__(self, name, columns=None):
        self.name = name  # named in the error when a gathered set is incomplete
        self.columns = ("ids", *columns) if columns is not None else self.columns
        self.rows = {c: [] for c in self.columns}

    def add(self, **values):
        """Append one batch: a list per column (``ids`` and every other column this batch has)."""
        for column, v in values.items():
            self.rows[column] += list(v)

    def __len__(self):
        return len(self.rows["ids"])

    def __getitem__(self, column):
        return self.rows[column]

    def gather(self, order):
        """All ranks' rows in the single-process ``order``, checked to be every evaluated utterance exactly once."""
        self.rows = D.gather_rows(self.rows, order, what=self.name)
        return self


class SERCollector(Collector):
    """Emotion outputs: true and predicted class index, class probabilities, speaker (and, for a generative model,
    the text it produced; leave ``prob`` or ``text`` out when there is none)."""

    columns = ("ids", "true", "pred", "prob", "spk", "text")

    def __init__(self, classes, name="ser"):
        super().__init__(name)
        self.classes = list(classes)

    def add_logits(self, ids, logits, labels, speakers):
        """A classifier's batch: the softmax of ``logits`` [B, C], its argmax, the labels [B] (or [B, 1])."""
        probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
        self.add(ids=ids, true=labels.view(-1).cpu().tolist(), pred=probs.argmax(-1).tolist(), prob=probs.tolist(),
                 spk=speakers)

    def summary(self):
        """Validation: UAR and macro-F1 in percent (empty when nothing was collected)."""
        if not len(self):
            return {}
        m = M.ser_metrics(self["true"], self["pred"], len(self.classes))
        return {"UAR": round(100 * m["uar"], 2), "MaF1": round(100 * m["macro_f1"], 2)}

    def report(self, num_bootstraps, seed, speaker_bootstrap):
        """Test: ``{"test": ser_report with 95% CIs, n, classes}`` (empty when nothing was collected)."""
        if not len(self):
            return {}
        rep = M.ser_report(self["true"], self["pred"], speakers=self["spk"] if speaker_bootstrap else None,
                           num_bootstraps=num_bootstraps, n_classes=len(self.classes), seed=seed)
        return {"test": {**rep, "n": len(self), "classes": self.classes}}


class ASRCollector(Collector):
    """Transcription outputs: reference and hypothesis per utterance."""

    columns = ("ids", "refs", "hyps")

    def __init__(self, name="asr"):
        super().__init__(name)

    def summary(self):
        """Validation: WER in percent (empty when nothing was collected)."""
        return {"WER": round(100 * M.wer(self["refs"], self["hyps"]), 2)} if len(self) else {}

    def report(self, num_bootstraps, seed):
        """Test: WER with its 95% CI (one scoring pass), after Whisper's normaliser, and 5 examples."""
        if not len(self):
            return {}
        w, ci = M.wer_ci(self["refs"], self["hyps"], num_bootstraps, seed=seed)
        # the same hypotheses scored after Whisper's English normaliser, as ASR papers report it
        return {"wer": w, "wer_ci": ci, "wer_whisper_norm": M.wer_whisper_norm(self["refs"], self["hyps"]),
                "asr_examples": [{"id": i, "ref": r, "hyp": h} for i, r, h in
                                 list(zip(self["ids"], self["refs"], self["hyps"]))[:5]]}


def write_ser_predictions(path, ser):
    """Per-utterance predictions (id, true, predicted, class probabilities) as CSV, for error analysis."""
    classes = ser.classes
    with atomic_write(path) as f:
        f.write("id,true,pred," + ",".join(classes) + "\n")
        for i, t, p, prob in zip(ser["ids"], ser["true"], ser["pred"], ser["prob"]):
            f.write(f"{i},{classes[t]},{classes[p]}," + ",".join(f"{x:.6f}" for x in prob) + "\n")
    return path


def write_asr_predictions(path, asr):
    """Per-utterance transcripts (id, ref, hyp) as CSV: what ``tools.compare_rows`` pairs for the matched-pair WER
    test (HarmoniFuse's asr_predictions.csv has the same columns plus its ``split``)."""
    with atomic_write(path, newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "ref", "hyp"])
        w.writerows(zip(asr["ids"], asr["refs"], asr["hyps"]))
    return path


def run_record(output_folder, test_loss, **fields):
    """The head of metrics.json: ``experiment`` (the output folder's name unless a field names it), the test loss,
    then the given fields that are set (None: left out)."""
    out = {"experiment": Path(output_folder).name, "test_loss": float(test_loss)}
    out.update({k: v for k, v in fields.items() if v is not None})
    return out
