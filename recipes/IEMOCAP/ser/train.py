#!/usr/bin/env python3
"""Fine-tune WavLM for 4-class SER on one IEMOCAP leave-one-session-out fold; exports the fine-tuned backbone
(this fold's W_SER). Classes: the YAML's ``emotion_classes`` (checked against the prepared ``classes.txt``).

    python train.py hparams/train_ser.yaml --data_folder /corpora/IEMOCAP_full_release --fold 1 [--key=value ...]
    python train.py hparams/train_ser.yaml --data_folder ... --train_annotation sb/train.json \
        --valid_annotation sb/valid.json --test_annotation sb/test.json   # SpeechBrain's IEMOCAP manifests
    torchrun --nproc_per_node=4 train.py hparams/train_ser.yaml --data_folder ... --fold 3

Writes to the output folder: metrics.json (UA = ``uar``, WA = ``accuracy``, 95% bootstrap CIs, with
``experiment`` and ``fold`` for ../average_folds.py), predictions.csv, confusion.png, finetuned_wavlm/.
"""
import sys
from pathlib import Path

import speechbrain as sb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/IEMOCAP: the prepare script
from iemocap_prepare import annotation_manifests, iemocap_manifests, prepare_from_hparams  # noqa: E402

from lobes.brains import ToolkitBrain, export_finetuned_backbone, fit_and_evaluate  # noqa: E402
from lobes.collectors import SERCollector, run_record  # noqa: E402
from lobes.dataio import class_counts, ser_datasets  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.memory_plan import resolve_micro_batch  # noqa: E402


class SERBrain(ToolkitBrain):
    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.ser = SERCollector(self.hparams.emotion_classes)

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        hidden, mask = self.modules.wavlm(wavs, lens)   # all hidden states [L+1, B, T, D]
        feats = self.modules.weighted_sum(hidden)       # α weighted layer sum (eq. 5)
        return self.modules.ser_head(feats, mask)       # emotion logits [B, C]

    def compute_objectives(self, logits, batch, stage):
        if stage != sb.Stage.TRAIN:
            self.ser.add_logits(batch.id, logits, batch.emo_idx.data, batch.spk_id)
        return self.hparams.loss(logits, batch.soft_label.data)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            return self.log_and_checkpoint(stage, stage_loss, epoch, {})
        self.gather(self.ser)  # DDP: every rank's outputs, in single-process order
        if stage == sb.Stage.VALID:
            return self.log_and_checkpoint(stage, stage_loss, epoch, self.ser.summary())
        h = self.hparams
        metrics = {**run_record(h.output_folder, self.stage_loss(stage, stage_loss), experiment=h.experiment,
                                fold=h.fold, table_rows=h.table_rows, alphas=h.weighted_sum.alpha().tolist()),
                   **self.ser.report(h.num_bootstraps, h.seed, h.speaker_bootstrap)}
        return self.write_test(metrics, self.ser,
                               confusion_title=f"{h.experiment}, fold {h.fold} (test Session {h.fold})")


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file,
                                   overrides=overrides)
    manifests = annotation_manifests(hparams)  # SpeechBrain-style train/valid/test_annotation, if given
    if manifests is None:
        prepare_from_hparams(hparams, hparams["emotion_classes"])
        manifests = iemocap_manifests(hparams)
    sb_format = {"label_map": hparams["speechbrain_label_map"], "data_root": hparams["data_folder"]}
    datasets = ser_datasets(manifests, hparams["emotion_classes"], **sb_format)
    hparams["loss"].set_counts(class_counts(manifests["train"], hparams["emotion_classes"], **sb_format))

    resolve_micro_batch(hparams, run_opts, SERBrain, datasets["train"])  # micro_batch_size: auto
    brain = SERBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
    export_finetuned_backbone(brain.modules.wavlm, hparams["export_folder"])
