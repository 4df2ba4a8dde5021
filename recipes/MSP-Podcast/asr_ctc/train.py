#!/usr/bin/env python3
"""CTC fine-tuning of WavLM on MSP-Podcast transcripts: the in-domain ASR model (W_ASR_in) of AdaLTM.

    python train.py hparams/train_asr_ctc.yaml --data_folder /path/to/MSP-Podcast [--key=value ...]
"""
import sys
from pathlib import Path

import speechbrain as sb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msp_podcast_prepare import msp_manifests, prepare_from_hparams  # noqa: E402

from lobes import ctc  # noqa: E402
from lobes.brains import ToolkitBrain, fit_and_evaluate  # noqa: E402
from lobes.collectors import ASRCollector, run_record  # noqa: E402
from lobes.ctc_export import export_ctc_model  # noqa: E402
from lobes.dataio import asr_datasets  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.memory_plan import resolve_micro_batch  # noqa: E402


class ASRBrain(ToolkitBrain):
    """WavLM -> linear CTC head on the last hidden state; greedy decoding and WER on valid/test."""

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.asr = ASRCollector()

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        hidden, mask = self.modules.wavlm(wavs, lens)                             # [L+1, B, T, D]
        logits = self.modules.ctc_head(hidden[-1])                                # [B, T, V]
        return torch.log_softmax(logits.float(), dim=-1), mask

    def compute_objectives(self, predictions, batch, stage):
        log_probs, mask = predictions
        if stage != sb.Stage.TRAIN:
            self.asr.add(ids=batch.id, refs=batch.wrd, hyps=ctc.greedy_hyps(log_probs, mask))
        tokens, token_lens = batch.tokens
        return ctc.ctc_loss(log_probs, mask, tokens, token_lens)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            return self.log_and_checkpoint(stage, stage_loss, epoch, {})
        self.gather(self.asr)  # DDP: every rank's outputs, in single-process order
        if stage == sb.Stage.VALID:
            return self.log_and_checkpoint(stage, stage_loss, epoch, self.asr.summary())
        h = self.hparams
        head = run_record(h.output_folder, self.stage_loss(stage, stage_loss))
        return self.write_test({**head, **self.asr.report(h.num_bootstraps, h.seed)}, asr=self.asr)


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file,
                                   overrides=overrides)
    prepare_from_hparams(hparams)
    datasets = asr_datasets(msp_manifests(hparams))

    resolve_micro_batch(hparams, run_opts, ASRBrain, datasets["train"])  # micro_batch_size: auto
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
    export_ctc_model(brain.modules.wavlm, brain.modules.ctc_head, hparams["export_folder"])  # + processor: pipeline()
