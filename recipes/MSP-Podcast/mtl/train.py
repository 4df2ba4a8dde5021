#!/usr/bin/env python3
"""Multi-task (CTC + SER) fine-tuning of the whole WavLM: the Table-1 Part-1 baselines.

    python train.py hparams/rows/fully_trainable.yaml --data_folder /path/to/MSP-Podcast
    python train.py hparams/rows/static_init.yaml --data_folder ... --vectors_folder exp/adaltm/task_vectors
"""
import sys
from pathlib import Path

import speechbrain as sb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msp_podcast_prepare import msp_manifests, prepare_from_hparams  # noqa: E402

from lobes import ctc  # noqa: E402
from lobes.brains import ToolkitBrain, fit_and_evaluate  # noqa: E402
from lobes.collectors import ASRCollector, SERCollector, run_record  # noqa: E402
from lobes.dataio import class_counts, ser_datasets  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.memory_plan import resolve_micro_batch  # noqa: E402
from lobes.adaltm.merged_wavlm import apply_static_merge  # noqa: E402


class MTLBrain(ToolkitBrain):
    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.ser, self.asr = SERCollector(self.hparams.emotion_classes), ASRCollector()

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        hidden, mask = self.modules.wavlm(wavs, lens)                             # [L+1, B, T, D]
        logits = self.modules.ser_head(self.modules.weighted_sum(hidden), mask)   # α sum (eq. 5) -> emotion head
        ctc_logits = self.modules.ctc_head(hidden[-1])                            # CTC head on the last layer
        return logits, torch.log_softmax(ctc_logits.float(), dim=-1), mask

    def compute_objectives(self, predictions, batch, stage):
        logits, log_probs, mask = predictions
        if stage != sb.Stage.TRAIN:
            self.ser.add_logits(batch.id, logits, batch.emo_idx.data, batch.spk_id)
            self.asr.add(ids=batch.id, refs=batch.wrd, hyps=ctc.greedy_hyps(log_probs, mask))
        ser = self.hparams.loss(logits, batch.soft_label.data)
        tokens, token_lens = batch.tokens
        asr = ctc.ctc_loss(log_probs, mask, tokens, token_lens)
        return self.hparams.ser_weight * ser + self.hparams.ctc_weight * asr

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            return self.log_and_checkpoint(stage, stage_loss, epoch, {})
        self.gather(self.ser, self.asr)  # DDP: every rank's outputs, in single-process order
        if stage == sb.Stage.VALID:
            return self.log_and_checkpoint(stage, stage_loss, epoch, {**self.ser.summary(), **self.asr.summary()})
        h = self.hparams
        metrics = {**run_record(h.output_folder, self.stage_loss(stage, stage_loss), table_rows=h.table_rows,
                                alphas=h.weighted_sum.alpha().tolist()),
                   **self.ser.report(h.num_bootstraps, h.seed, h.speaker_bootstrap),
                   **self.asr.report(h.num_bootstraps, h.seed)}
        return self.write_test(metrics, self.ser, asr=self.asr)


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file,
                                   overrides=overrides)
    prepare_from_hparams(hparams, hparams["emotion_classes"])
    manifests = msp_manifests(hparams)
    datasets = ser_datasets(manifests, hparams["emotion_classes"], with_text=True)
    hparams["loss"].set_counts(class_counts(manifests["train"], hparams["emotion_classes"]))
    # Static init (before the checkpointer may resume a later state over it)
    apply_static_merge(hparams["wavlm"].model, hparams["init_task_vectors"], hparams["init_lambda"])

    resolve_micro_batch(hparams, run_opts, MTLBrain, datasets["train"])  # micro_batch_size: auto
    brain = MTLBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
