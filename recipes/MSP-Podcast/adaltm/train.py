#!/usr/bin/env python3
"""AdaLTM: train λ (eq. 4), α (eq. 5) and the emotion head on a frozen, task-vector-merged WavLM.

    python train.py hparams/rows/setup4_dual.yaml --data_folder /path/to/MSP-Podcast \
        --wavlm_source microsoft/wavlm-large --vectors_folder exp/adaltm/task_vectors
    torchrun --nproc_per_node=2 train.py hparams/rows/setup4_dual.yaml ...

Writes to the output folder: metrics.json (UAR / precision / MaF1 with 95% CIs), coefficients.json (λ per
group per vector, α per layer), λ / α / confusion plots, and the folded model (folded_wavlm/).
"""
import sys
from pathlib import Path

import speechbrain as sb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msp_podcast_prepare import msp_manifests, prepare_from_hparams  # noqa: E402

from lobes.adaltm.brain import AdaLTMBrainBase, use_feature_cache  # noqa: E402
from lobes.adaltm.feature_cache import cached_hidden  # noqa: E402
from lobes.brains import fit_and_evaluate  # noqa: E402
from lobes.collectors import SERCollector, run_record  # noqa: E402
from lobes.dataio import class_counts, ser_datasets  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.memory_plan import resolve_micro_batch  # noqa: E402


class AdaLTMBrain(AdaLTMBrainBase):
    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.ser = SERCollector(self.hparams.emotion_classes)

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        if hasattr(batch, "feats"):  # cached hidden states [B, T, L+1, D] or pooled [B, L+1, D]
            hidden, mask = cached_hidden(*batch.feats)
        else:
            wavs, lens = batch.sig
            hidden, mask = self.modules.wavlm(wavs, lens)  # task-vector-merged WavLM (eq. 4), [L+1, B, T, D]
        feats = self.modules.weighted_sum(hidden)          # α weighted layer sum (eq. 5)
        return self.modules.ser_head(feats, mask)          # emotion logits [B, C]

    def compute_objectives(self, logits, batch, stage):
        if stage != sb.Stage.TRAIN:
            self.ser.add_logits(batch.id, logits, batch.emo_idx.data, batch.spk_id)
        return self.hparams.loss(logits, batch.soft_label.data)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            return self.log_and_checkpoint(stage, stage_loss, epoch, {})
        self.gather(self.ser)  # DDP: every rank's outputs, in single-process order
        if stage == sb.Stage.VALID:
            return self.log_and_checkpoint(stage, stage_loss, epoch, {**self.ser.summary(), **self.lambda_means()})
        h = self.hparams
        metrics = {**run_record(h.output_folder, self.stage_loss(stage, stage_loss), table_rows=h.table_rows,
                                alphas=h.weighted_sum.alpha().tolist()),
                   **self.ser.report(h.num_bootstraps, h.seed, h.speaker_bootstrap), "lambdas": self.lambda_record()}
        self.write_test(metrics, self.ser)
        self.write_artifacts()  # coefficients.json, λ / α plots, the folded model
        return metrics


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file,
                                   overrides=overrides)
    prepare_from_hparams(hparams, hparams["emotion_classes"])
    manifests = msp_manifests(hparams)
    device = run_opts.get("device") or sb.utils.distributed.infer_device()
    datasets = ser_datasets(manifests, hparams["emotion_classes"])
    hparams["loss"].set_counts(class_counts(manifests["train"], hparams["emotion_classes"]))
    # micro_batch_size: auto, planned on audio before any cache: an in-RAM cache under DDP keeps the utterances of
    # this rank's batches, which follow the micro-batch (for a cached row the plan is conservative: it counts the
    # backbone's forward that the cache then saves)
    resolve_micro_batch(hparams, run_opts, AdaLTMBrain, datasets["train"])
    datasets = use_feature_cache(hparams, datasets, device)
    brain = AdaLTMBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
