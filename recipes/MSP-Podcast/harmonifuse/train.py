#!/usr/bin/env python3
"""HarmoniFuse: one speech LM for ASR (LibriSpeech) and 8-class SER (MSP-Podcast), batch-interleaved.

    python train.py hparams/harmonifuse.yaml --msp_folder /data/MSP-Podcast --libri_folder /data/LibriSpeech \
        --wavlm_source microsoft/wavlm-large --lm_source /models/my-causal-lm
    python train.py hparams/rows/static_encoder_fusion.yaml ...            # an ablation row
    torchrun --nproc_per_node=4 train.py hparams/harmonifuse.yaml ...       # DDP: each rank its own shards

Training alternates whole batches of one task (ratio ``interleave_ratio``), the task prompt set per batch; no
utterance needs both labels. Validation runs both tasks; the kept checkpoint has the lowest combined
validation loss (mean ASR batch loss + mean SER batch loss). The test stage writes to the output folder:
metrics.json (``wer`` = first test split, ``wer_by_split``; SER ``test`` report with 95% CIs and ``ua`` / ``wa``
/ ``macro_f1``), fusion_weights.json, encoder_layer_weights.png, lm_fusion_weights.png, confusion.png and
per-utterance asr_predictions.csv / ser_predictions.csv. A generated SER output that is not exactly one of
the class names (``emotion_classes``) is "invalid" and counted as wrong (see ``ser_report_with_invalid``).

DDP (``torchrun``): training deals the single-process interleaved batches out to the ranks
(``lobes.harmonifuse.interleave.ShardedBatches``): every rank runs the same task at every step, step k covers
single-process batches kW .. kW+W-1 of that task, so ``asr_batch_size`` / ``ser_batch_size`` are per rank and an
epoch (``interleave_length`` counts single-process batches) covers the same data for any GPU count.
Validation and test run rank r's share r, r+W, ... of the single-process evaluation batches
(``ToolkitBrain.make_dataloader``); the per-utterance outputs, the batch losses and the fusion statistics are
gathered back in single-process order before anything is scored, so metrics.json does not depend on W.
The training step reads nothing from the device: per-source training losses are summed on the device and read
once at the end of the stage; a non-finite loss stops the loop in ``ToolkitBrain.check_loss_isfinite``.
"""
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.sampler import DynamicBatchSampler, ReproducibleRandomSampler
from torch.utils.data import BatchSampler, SequentialSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "LibriSpeech"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "IEMOCAP"))
from iemocap_prepare import prepare_iemocap  # noqa: E402
from librispeech_prepare import prepare_librispeech  # noqa: E402
from msp_podcast_prepare import prepare_msp_podcast  # noqa: E402

from lobes import distributed as D  # noqa: E402
from lobes import metrics as M  # noqa: E402
from lobes import plots  # noqa: E402
from lobes.brains import ToolkitBrain  # noqa: E402
from lobes.ctc_text import normalize_transcript  # noqa: E402
from lobes.dataio import asr_datasets, ser_datasets  # noqa: E402
from lobes.errors import DataError  # noqa: E402
from lobes.harmonifuse.interleave import (  # noqa: E402
    SequentialTaskBatchSampler,
    TaskTaggedConcat,
    batch_task,
    make_interleaved_dataloader,
)
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.io_utils import atomic_write  # noqa: E402

INVALID = "<invalid>"                         # column of generated SER outputs that are not a class name


# ------------------------------------------------------------------------------------------------ SER scoring
def emotion_index(text, classes):
    """Generated text -> class index; anything but an exact class name (surrounding spaces aside) is invalid
    (index ``len(classes)``, the column after the classes; never a true label)."""
    text = text.strip()
    return classes.index(text) if text in classes else len(classes)


def _emotion_scores(confusion):
    """UA, WA, macro precision and macro F1 of a (K+1)x(K+1) confusion whose last column is "invalid".

    An invalid output is a miss of its true class (lowers that class's recall and F1, and WA) but is not a
    class of its own: precision / F1 are averaged over the K emotions only (those in y_true or predicted),
    which is what ``lobes.metrics.metrics_from_confusion`` gives when nothing is invalid.
    """
    import numpy as np

    c = np.asarray(confusion, dtype=np.float64)
    k = c.shape[0] - 1
    tp = np.diag(c)[:k]
    n_true, n_pred = c[:k].sum(1), c[:, :k].sum(0)
    in_true, in_any = n_true > 0, (n_true > 0) | (n_pred > 0)
    recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=in_true)
    prec = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros_like(tp), where=in_any)
    return {"uar": float(recall[in_true].mean()), "precision": float(prec[in_any].mean()),
            "macro_f1": float(f1[in_any].mean()), "accuracy": float(tp.sum() / c.sum())}


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
            return _emotion_scores(M.confusion_counts(labels, samples, k + 1))[name]
        report[name], report[f"{name}_ci"] = M.bootstrap_ci(y_true, y_pred, fn, num_bootstraps=num_bootstraps,
                                                            conditions=speakers, seed=seed)
    report["per_class_recall"] = report["per_class_recall"][:k]
    report["n_invalid"] = sum(1 for p in y_pred if p == k)
    return report


# ------------------------------------------------------------------------------------------------ the Brain
class HarmoniFuseBrain(ToolkitBrain):
    """Batches carry ``task`` (``asr`` / ``ser``; evaluation tags ``asr:<split>``, ``ser:<split>``)."""

    @property
    def speech_lm(self):
        m = self.modules.speech_lm
        return m.module if hasattr(m, "module") else m  # DDP wrapper -> model (generate, fusion_weights)

    # -- forward / objectives ----------------------------------------------------------------------------
    def targets(self, batch, task):
        """Target texts from the host batch (call before it moves to the device: no device read)."""
        if task == "asr":
            return list(batch.wrd)
        return [self.classes[i] for i in batch.emo_idx.data.view(-1).tolist()]

    def decoding(self, stage):
        if stage == sb.Stage.TEST:
            return True
        if stage != sb.Stage.VALID:
            return False
        epoch = self.hparams.epoch_counter.current
        return epoch % self.hparams.valid_search_interval == 0 or epoch >= self.hparams.number_of_epochs

    def compute_forward(self, batch, stage):
        tag = batch_task(batch)
        task = tag.split(":")[0]
        targets = self.targets(batch, task)
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        # evaluation bypasses the DDP wrapper: its forward may broadcast buffers (a collective), and the ranks'
        # evaluation shards can differ in batch count (or be empty)
        model = self.modules.speech_lm if stage == sb.Stage.TRAIN else self.speech_lm
        out = model(wavs, lens, task, targets)
        hyps = None
        if self.decoding(stage):
            max_len = self.hparams.asr_max_decode_len if task == "asr" else self.hparams.ser_max_decode_len
            hyps = self.speech_lm.generate(wavs, lens, task, max_len=max_len, num_beams=self.hparams.num_beams,
                                           length_penalty=self.hparams.length_penalty)
        return tag, task, out, hyps

    def compute_objectives(self, predictions, batch, stage):
        tag, task, out, hyps = predictions
        loss = out.loss
        if stage == sb.Stage.TRAIN:
            # per-source running sum kept on the device (read once at the stage end); a non-finite loss stops
            # training in check_loss_isfinite, right after this, before it is ever read
            sums = self.task_loss.setdefault(tag, [0.0, 0])
            sums[0] = sums[0] + loss.detach()
            sums[1] += 1
            self.rank_batches += 1
            return loss
        # evaluation: one row per batch, keyed by its first utterance (gathered across ranks like the outputs)
        self.rank_batches += 1
        self.eval_losses["ids"].append(batch.id[0])
        self.eval_losses["tag"].append(tag)
        self.eval_losses["loss"].append(float(loss))
        if hyps is not None:
            if task == "asr":
                self.asr_out["ids"] += list(batch.id)
                self.asr_out["split"] += [tag.partition(":")[2] or "valid"] * len(batch.id)
                self.asr_out["refs"] += [normalize_transcript(r) for r in batch.wrd]
                self.asr_out["hyps"] += [normalize_transcript(h) for h in hyps]
            else:
                self.ser_out["ids"] += list(batch.id)
                self.ser_out["true"] += batch.emo_idx.data.view(-1).cpu().tolist()
                self.ser_out["pred"] += [emotion_index(h, self.classes) for h in hyps]
                self.ser_out["text"] += list(hyps)
                self.ser_out["spk"] += list(batch.spk_id)
        return loss

    # -- stages --------------------------------------------------------------------------------------------
    def reset_outputs(self):
        self.rank_batches = 0                                      # batches this rank ran in the stage
        self.task_loss = {}                                        # training: tag -> [device sum, batches]
        self.eval_losses = {"ids": [], "tag": [], "loss": []}      # evaluation: one row per batch
        self.asr_out = {"ids": [], "split": [], "refs": [], "hyps": []}
        self.ser_out = {"ids": [], "true": [], "pred": [], "text": [], "spk": []}

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TEST:
            self.speech_lm.reset_fusion_stats()  # the plotted dynamic weights are those of the test inputs

    def sync_outputs(self):
        """ToolkitBrain's gather of ser_out / asr_out (single-process order), plus the evaluation batch losses."""
        synced = self._synced
        super().sync_outputs()
        if self._synced and not synced:
            self.eval_losses = D.gather_rows(self.eval_losses, self._eval_order[self._stage])

    def stage_loss(self, stage, stage_loss):
        return stage_loss  # the task-combined loss from the gathered batch losses (see combined_loss)

    @property
    def asr_by_split(self):
        """{split: {"ids", "refs", "hyps"}} from the (gathered) ASR rows, splits in first-seen order."""
        out = {}
        for row in zip(*(self.asr_out[k] for k in ("ids", "split", "refs", "hyps"))):
            o = out.setdefault(row[1], {"ids": [], "refs": [], "hyps": []})
            for k, v in zip(("ids", "refs", "hyps"), (row[0], row[2], row[3])):
                o[k].append(v)
        return out

    def task_means(self):
        """tag -> mean batch loss: training from the device sums (one read), evaluation from the batch rows
        summed in single-process order (the same floats for any number of ranks)."""
        if self.task_loss:
            return {tag: float(s) / n for tag, (s, n) in self.task_loss.items() if n}
        sums = {}
        for tag, loss in zip(self.eval_losses["tag"], self.eval_losses["loss"]):
            s = sums.setdefault(tag, [0.0, 0])
            s[0] += loss
            s[1] += 1
        return {tag: s / n for tag, (s, n) in sums.items()}

    def combined_loss(self):
        """Σ over tasks of the task's mean batch loss: each task counts once, whatever its batch count."""
        by_task = {}
        for tag, v in self.task_means().items():
            by_task.setdefault(tag.split(":")[0], []).append(v)
        return sum(sum(v) / len(v) for v in by_task.values())

    def ser_scores(self):
        if not self.ser_out["true"]:
            return {}
        m = _emotion_scores(M.confusion_counts(self.ser_out["true"], self.ser_out["pred"], len(self.classes) + 1))
        n_inv = sum(p == len(self.classes) for p in self.ser_out["pred"])
        return {"UA": round(100 * m["uar"], 2), "WA": round(100 * m["accuracy"], 2), "invalid": n_inv}

    def on_stage_end(self, stage, stage_loss, epoch=None):
        self.sync_outputs()
        if stage == sb.Stage.TEST:
            return self.write_test_outputs()
        stats = {f"loss_{tag.split(':')[0]}": round(v, 4) for tag, v in self.task_means().items()}
        # batches each rank ran (DDP: training gives every rank the same count, evaluation r, r+W, ...)
        stats["batches"] = D.all_gather(self.rank_batches)
        if stage == sb.Stage.TRAIN:
            return self.log_and_checkpoint(stage, stage_loss, epoch, stats)
        if self.asr_out["refs"]:
            stats["WER"] = round(100 * M.wer(self.asr_out["refs"], self.asr_out["hyps"]), 2)
        stats.update(self.ser_scores())
        for task in self.hparams.train_tasks:
            w = self.speech_lm.encoder_fusion.layer_weights(task)
            stats[f"enc_top_layer_{task}"] = int(w.argmax()) + 1
        self.log_and_checkpoint(stage, self.combined_loss(), epoch, stats)

    # -- test outputs -------------------------------------------------------------------------------------
    def write_test_outputs(self):
        h = self.hparams
        self.sync_outputs()
        gather_fusion_stats(self.speech_lm)
        out = {"experiment": h.experiment, "test_loss": self.combined_loss(), "train_tasks": list(h.train_tasks),
               "encoder_fusion": fusion_description(self.speech_lm), "lm_fusion": self.speech_lm.lm_fusion.mode,
               "lm_mode": self.speech_lm.lm_mode, "prompt_mode": self.speech_lm.prompt_mode,
               "test_loss_by_split": self.task_means()}
        if h.table_rows:
            out["table_rows"] = h.table_rows
        asr_by_split = self.asr_by_split
        if asr_by_split:
            details = {split: M.wer_details(o["refs"], o["hyps"]) for split, o in asr_by_split.items()}
            for split, o in asr_by_split.items():
                details[split]["wer_ci"] = M.wer_ci(o["refs"], o["hyps"], h.num_bootstraps, seed=h.seed)[1]
                details[split]["wer_whisper_norm"] = M.wer_whisper_norm(o["refs"], o["hyps"])
            first = next(iter(details))  # libri_test_splits order: test-clean first
            out["wer"] = details[first]["wer"]
            out["wer_split"] = first
            out["wer_by_split"] = details
            for split, d in details.items():
                out[f"wer_{split.replace('test-', '')}"] = d["wer"]
                out[f"wer_{split.replace('test-', '')}_ci"] = d["wer_ci"]
            o = asr_by_split[first]
            out["asr_examples"] = [{"id": i, "ref": r, "hyp": x} for i, r, x in
                                   list(zip(o["ids"], o["refs"], o["hyps"]))[:5]]
        if self.ser_out["true"]:
            speakers = self.ser_out["spk"] if h.speaker_bootstrap else None
            rep = ser_report_with_invalid(self.ser_out["true"], self.ser_out["pred"], len(self.classes), speakers,
                                          num_bootstraps=h.num_bootstraps, seed=h.seed)
            out["test"] = {**rep, "classes": self.classes + [INVALID]}
            out.update({"ua": rep["uar"], "wa": rep["accuracy"], "macro_f1": rep["macro_f1"],
                        "invalid_rate": rep["n_invalid"] / rep["n"]})
        stats = {k: round(100 * out[k], 2) for k in ("wer", "ua", "wa") if k in out}
        stats["batches"] = D.all_gather(self.rank_batches)  # per rank (train_log.txt only: metrics.json is W-free)
        h.train_logger.log_stats(stats_meta={"Epoch loaded": h.epoch_counter.current},
                                 test_stats={"loss": out["test_loss"], **stats})
        if sb.utils.distributed.if_main_process():
            folder = Path(h.output_folder)
            M.write_metrics(folder / "metrics.json", out)
            self.write_predictions(folder)
            write_fusion_artifacts(self.speech_lm, list(h.train_tasks), folder)
            if "test" in out:
                plots.plot_confusion(out["test"]["confusion"], self.classes + [INVALID], folder / "confusion.png",
                                     title=f"SER confusion — {h.experiment}")
        return out

    def write_predictions(self, folder):
        asr_by_split = self.asr_by_split
        if asr_by_split:
            with atomic_write(folder / "asr_predictions.csv", newline="") as f:
                w = csv.writer(f)
                w.writerow(["split", "id", "ref", "hyp"])
                for split, o in asr_by_split.items():
                    for row in zip(o["ids"], o["refs"], o["hyps"]):
                        w.writerow([split, *row])
        if self.ser_out["true"]:
            with atomic_write(folder / "ser_predictions.csv", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "true", "pred", "generated"])
                for i, t, p, text in zip(self.ser_out["ids"], self.ser_out["true"], self.ser_out["pred"],
                                         self.ser_out["text"]):
                    w.writerow([i, self.classes[t], (self.classes + [INVALID])[p], text])


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
                                 title=f"LM layer weights (lm_fusion={data['lm_fusion']}), mean over test utterances")
    return data


# ------------------------------------------------------------------------------------------------ data
def check_hparams(hparams):
    tasks = hparams["train_tasks"]
    if not tasks or set(tasks) - {"asr", "ser"} or len(set(tasks)) != len(tasks):
        raise DataError(f"train_tasks must be a non-empty subset of [asr, ser], got {tasks}")
    missing = [t for t in tasks if not hparams["interleave_ratio"].get(t)]
    if missing:
        raise DataError(f"interleave_ratio {hparams['interleave_ratio']} gives no batches to trained task(s) {missing}")
    if "asr" in tasks and not hparams["libri_test_splits"]:
        raise DataError("libri_test_splits is empty: ASR needs at least one test split (e.g. [test-clean])")
    if hparams["ser_corpus"] not in ("msp_podcast", "iemocap"):
        raise DataError(f"ser_corpus must be 'msp_podcast' or 'iemocap', got '{hparams['ser_corpus']}'")
    if hparams["ser_corpus"] == "iemocap" and "ser" in tasks and int(hparams["iemocap_fold"]) not in range(1, 6):
        raise DataError(f"iemocap_fold must be a session number 1..5, got {hparams['iemocap_fold']}")
    extra = hparams["ser_extra_sources"] or {}
    if extra and "ser" not in tasks:
        raise DataError(f"ser_extra_sources {sorted(extra)} need 'ser' in train_tasks, got {tasks}")
    missing = [f"ser:{n}" for n in extra if not hparams["interleave_ratio"].get(f"ser:{n}")]
    if missing:
        raise DataError(f"interleave_ratio {hparams['interleave_ratio']} gives no batches to the extra SER "
                        f"source(s) {missing} (add e.g. '{missing[0]}': 1)")


def train_sources(hparams):
    """Interleaved training sources: the trained tasks, then one ``ser:<name>`` per ``ser_extra_sources`` entry."""
    return list(hparams["train_tasks"]) + [f"ser:{n}" for n in (hparams["ser_extra_sources"] or {})]


def needs_unused_parameter_search(hparams):
    """DDP's ``find_unused_parameters``: only the classify head is idle on some batches (those of ASR)."""
    return hparams["ser_mode"] == "classify" and "asr" in hparams["train_tasks"]


def ser_prep_folder(hparams):
    """Where the SER train/valid/test manifests are: MSP-Podcast's, or the IEMOCAP fold's."""
    if hparams["ser_corpus"] == "iemocap":
        return Path(hparams["iemocap_prep_folder"]) / f"fold{hparams['iemocap_fold']}"
    return Path(hparams["msp_prep_folder"])


def prepare(hparams):
    tasks = hparams["train_tasks"]
    if "ser" in tasks and hparams["ser_corpus"] == "iemocap":
        sb.utils.distributed.run_on_main(prepare_iemocap, kwargs={
            "data_folder": hparams["iemocap_folder"], "save_folder": hparams["iemocap_prep_folder"],
            "folds": (int(hparams["iemocap_fold"]),), "asr_manifests": False})
    elif "ser" in tasks:
        sb.utils.distributed.run_on_main(prepare_msp_podcast, kwargs={
            "data_folder": hparams["msp_folder"], "save_folder": hparams["msp_prep_folder"],
            "transcript_only": hparams["transcript_only"], "test_splits": hparams["test_splits"],
            "classes": hparams["emotion_classes"]})
    if "asr" in tasks:
        train, valid = list(hparams["libri_train_splits"]), hparams["libri_valid_split"]
        tests = list(hparams["libri_test_splits"])
        splits, required = train + [valid] + tests, train + [valid, tests[0]]
        sb.utils.distributed.run_on_main(prepare_librispeech, kwargs={
            "data_folder": hparams["libri_folder"], "save_folder": hparams["libri_prep_folder"],
            "splits": tuple(dict.fromkeys(splits)), "required_splits": tuple(required)})


def libri_train_manifest(hparams):
    """One manifest for the ASR training splits (several splits are merged into one file, once)."""
    folder = Path(hparams["libri_prep_folder"])
    splits = list(hparams["libri_train_splits"])
    if len(splits) == 1:
        return str(folder / f"{splits[0]}.json")
    merged = folder / ("train_" + "+".join(splits) + ".json")
    if sb.utils.distributed.if_main_process():
        data = {}
        for s in splits:
            path = folder / f"{s}.json"
            try:
                part = json.loads(path.read_text())
            except FileNotFoundError:
                raise DataError(f"manifest '{path}' does not exist: run data preparation (stage 0) first") from None
            dup = set(part) & set(data)
            if dup:
                raise DataError(f"{path}: utterance ids also in another training split, e.g. {sorted(dup)[:3]}")
            data.update(part)
        with atomic_write(merged) as f:
            json.dump(data, f, indent=2)
    sb.utils.distributed.ddp_barrier()
    return str(merged)


def build_datasets(hparams):
    """{"train" | "valid" | "test": {tag: dataset}}; tags: asr, ser (train), asr:<split>, ser:<split> (eval)."""
    tasks = hparams["train_tasks"]
    out = {"train": {}, "valid": {}, "test": {}}
    if "asr" in tasks:
        lp = Path(hparams["libri_prep_folder"])
        man = {"train": libri_train_manifest(hparams), "valid": str(lp / f"{hparams['libri_valid_split']}.json")}
        first = lp / f"{hparams['libri_test_splits'][0]}.json"
        if not first.exists():  # later splits (test-other) are optional, the first one is the reported WER
            raise DataError(f"manifest '{first}' does not exist: run data preparation (stage 0) first")
        tests = [s for s in hparams["libri_test_splits"] if (lp / f"{s}.json").exists()]
        man.update({f"test:{s}": str(lp / f"{s}.json") for s in tests})
        ds = asr_datasets(man)
        out["train"]["asr"] = ds["train"]
        out["valid"][f"asr:{hparams['libri_valid_split']}"] = ds["valid"]
        out["test"].update({f"asr:{s}": ds[f"test:{s}"] for s in tests})
    if "ser" in tasks:
        mp = ser_prep_folder(hparams)
        if hparams["ser_corpus"] == "iemocap":  # the head's classes must be the prepared ones, in their order
            listed = Path(hparams["iemocap_prep_folder"]) / "classes.txt"
            prepared = listed.read_text().split() if listed.is_file() else None
            if prepared != list(hparams["emotion_classes"]):
                raise DataError(f"emotion_classes {list(hparams['emotion_classes'])} differ from the prepared "
                                f"IEMOCAP classes {prepared} ({listed})")
        ds = ser_datasets({s: str(mp / f"{s}.json") for s in ("train", "valid", "test")}, hparams["emotion_classes"])
        out["train"]["ser"] = ds["train"]
        out["valid"]["ser:valid"] = ds["valid"]
        out["test"]["ser:test"] = ds["test"]
        # extra SER training sources (e.g. a tools.pseudo_label manifest): interleaved as SER batches of their own
        for name, manifest in (hparams["ser_extra_sources"] or {}).items():
            if not Path(manifest).is_file():
                raise DataError(f"ser_extra_sources.{name}: manifest '{manifest}' does not exist")
            out["train"][f"ser:{name}"] = ser_datasets({"train": str(manifest)}, hparams["emotion_classes"])["train"]
    return out


def task_batch_sampler(hparams, dataset, task, train):
    """Batches of one task's dataset as a single process runs them: fixed size or dynamic (seconds of audio),
    shuffled with the recipe seed when training (the same batches on every DDP rank; make_loaders shards)."""
    if hparams["dynamic_batching"]:
        return DynamicBatchSampler(
            dataset, max_batch_length=hparams[f"max_batch_length_{task}"], num_buckets=hparams["num_buckets"],
            length_func=lambda x: x["duration"], shuffle=train, batch_ordering="random" if train else "ascending",
            seed=hparams["seed"])
    base = ReproducibleRandomSampler(dataset, seed=hparams["seed"]) if train else SequentialSampler(dataset)
    return BatchSampler(base, hparams[f"{task}_batch_size"], drop_last=False)


def make_loaders(hparams, datasets):
    """-> training DataLoader (interleaved, this rank's shard under DDP), and for validation and test a
    (dataset, loader kwargs) pair that ``Brain.fit`` / ``evaluate`` turn into this rank's sharded loader."""
    tasks = train_sources(hparams)
    ratio = {t: hparams["interleave_ratio"][t] for t in tasks}
    length = hparams["interleave_length"]
    train = make_interleaved_dataloader(
        datasets["train"],
        {t: task_batch_sampler(hparams, datasets["train"][t], t.split(":")[0], True) for t in tasks},
        ratio=ratio, length=int(length) if str(length).isdigit() else length, order=hparams["interleave_order"],
        seed=hparams["seed"], num_workers=hparams["num_workers"], rank=D.rank(), world=D.world_size())

    def evaluation(sets):
        concat = TaskTaggedConcat(sets)
        ids = concat.data_ids
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dup:  # outputs are gathered across ranks by utterance id
            raise DataError(f"evaluation sets {list(sets)} share utterance ids, e.g. {dup[:3]}")
        sampler = SequentialTaskBatchSampler(
            {tag: task_batch_sampler(hparams, ds, tag.split(":")[0], False) for tag, ds in sets.items()},
            concat.offsets)
        return concat, {"batch_sampler": sampler, "collate_fn": PaddedBatch, "num_workers": hparams["num_workers"]}

    return train, evaluation(datasets["valid"]), evaluation(datasets["test"])


# ------------------------------------------------------------------------------------------------ main
if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file, overrides=overrides)
    check_hparams(hparams)
    if not hparams["skip_prep"]:
        prepare(hparams)
    datasets = build_datasets(hparams)
    train_loader, (valid_set, valid_kwargs), (test_set, test_kwargs) = make_loaders(hparams, datasets)

    brain = HarmoniFuseBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                             run_opts=run_opts, checkpointer=hparams["checkpointer"])
    # Every trainable parameter gets a gradient from every batch (SpeechLM freezes what cannot: WavLM's
    # masked_spec_embed, the layers above a fixed layer; lm_fusion "last" has no parameters), except the SER
    # classification head on ASR batches: only then must DDP search for unused parameters.
    brain.find_unused_parameters = brain.find_unused_parameters or needs_unused_parameter_search(hparams)
    brain.train_sampler = train_loader.batch_sampler  # fit() calls its set_epoch(epoch) every epoch
    brain.fit(hparams["epoch_counter"], train_loader, valid_set, valid_loader_kwargs=valid_kwargs)
    brain.evaluate(test_set, min_key="loss", test_loader_kwargs=test_kwargs)
