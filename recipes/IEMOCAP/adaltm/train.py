#!/usr/bin/env python3
"""AdaLTM on one IEMOCAP leave-one-session-out fold: train λ (eq. 4), α (eq. 5) and the 4-class emotion head on a
frozen WavLM merged with this fold's task vectors (ΔW_ASR from ../asr_ctc, ΔW_SER from ../ser, both trained
without the test session). Same model, loss and outputs as recipes/MSP-Podcast/adaltm; only the data differ.

    python train.py hparams/rows/setup4_dual.yaml --data_folder /corpora/IEMOCAP_full_release --fold 1 \
        --wavlm_source microsoft/wavlm-large --vectors_folder exp/iemocap/task_vectors/fold1

Writes to the output folder: metrics.json (UA = ``uar``, WA = ``accuracy``, 95% CIs, ``experiment`` and ``fold``
for ../average_folds.py), predictions.csv, coefficients.json (λ per group per vector, α per layer), λ / α /
confusion plots, and the folded model (folded_wavlm/).
"""
import json
import sys
from pathlib import Path

import speechbrain as sb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/IEMOCAP: the prepare script
from iemocap_prepare import iemocap_manifests, prepare_from_hparams  # noqa: E402

from lobes import plots  # noqa: E402
from lobes.adaltm.feature_cache import FeatureCache  # noqa: E402
from lobes.adaltm.fold_export import export_folded  # noqa: E402
from lobes.adaltm.layer_groups import group_names  # noqa: E402
from lobes.brains import ToolkitBrain, fit_and_evaluate  # noqa: E402
from lobes.dataio import class_counts, ser_datasets  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.io_utils import atomic_write  # noqa: E402
from lobes.wavlm_encoder import lengths_to_mask  # noqa: E402


class AdaLTMBrain(ToolkitBrain):
    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        if hasattr(batch, "feats"):  # cached hidden states [B, T, L+1, D]
            feats, lens = batch.feats
            hidden, mask = feats.permute(2, 0, 1, 3), lengths_to_mask(lens, feats.shape[1])
        else:
            wavs, lens = batch.sig
            hidden, mask = self.modules.wavlm(wavs, lens)  # task-vector-merged WavLM (eq. 4), [L+1, B, T, D]
        feats = self.modules.weighted_sum(hidden)          # α weighted layer sum (eq. 5)
        return self.modules.ser_head(feats, mask)          # emotion logits [B, C]

    def compute_objectives(self, logits, batch, stage):
        if stage != sb.Stage.TRAIN:
            self.collect_ser(batch, logits)
        return self.hparams.loss(logits, batch.soft_label.data)

    def coefficients(self):
        """λ per group per task vector and α per layer (for logs, plots, the model card)."""
        wavlm = self.hparams.wavlm
        return {"lambda": wavlm.coefficients(), "alpha": self.hparams.weighted_sum.alpha().tolist(),
                "groups": group_names(wavlm.num_layers), "lambda_mode": wavlm.lambdas.mode}

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage != sb.Stage.TEST:
            stats = self.ser_stats()
            lam = self.hparams.wavlm.coefficients()
            stats.update({f"λ_{k} mean": round(sum(v) / len(v), 4) for k, v in lam.items()})
            return self.log_and_checkpoint(stage, stage_loss, epoch, stats)
        h, coeffs = self.hparams, self.coefficients()
        out = self.write_test_metrics(stage_loss, {"experiment": h.experiment, "fold": h.fold,
                                                   "lambdas": coeffs["lambda"], "alphas": coeffs["alpha"]})
        if sb.utils.distributed.if_main_process():
            self.write_artifacts(coeffs, out)

    def write_artifacts(self, coeffs, metrics):
        h, folder = self.hparams, Path(self.hparams.output_folder)
        with atomic_write(folder / "coefficients.json") as f:
            json.dump(coeffs, f, indent=2)
        if coeffs["lambda"]:
            plots.plot_lambdas(coeffs["lambda"], folder / "lambdas.png",
                               title=f"λ per group — {h.experiment}, fold {h.fold}")
        plots.plot_layer_weights({"α": coeffs["alpha"]}, folder / "alphas.png", title="α per layer", first_index=1)
        plots.plot_confusion(metrics["test"]["confusion"], self.classes, folder / "confusion.png",
                             title=f"{h.experiment}, fold {h.fold} (test Session {h.fold})")
        export_folded(h.wavlm, h.export_folder, {"weighted_sum": h.weighted_sum, "ser_head": h.ser_head},
                      {"classes": self.classes, "head_hidden": h.head_hidden, "pooling": h.pooling,
                       "num_layers": h.wavlm.num_layers, "hidden_size": h.wavlm.hidden_size,
                       "include_cnn": h.weighted_sum.include_cnn, "layer_norm": h.weighted_sum.layer_norm,
                       "normalize_wav": h.wavlm.normalize_wav})


def use_feature_cache(hparams, datasets):
    """Swap audio for cached hidden states when nothing upstream of them is trained (Setup 1, fixed λ)."""
    wavlm = hparams["wavlm"]
    static = wavlm.num_vectors == 0 or not wavlm.lambdas.lam.requires_grad
    if not (hparams["cache_features"] and static):
        return datasets
    cache_dir = hparams["feature_cache_dir"]
    for split, ds in datasets.items():
        cache_file = Path(cache_dir) / f"{split}.safetensors" if cache_dir else None
        cache = FeatureCache.build(wavlm, ds, cache_file, dtype=hparams["cache_dtype"])
        ds.add_dynamic_item(cache.pipeline())
        ds.set_output_keys(["id", "feats", "emo_idx", "soft_label", "spk_id"])
    return datasets


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file,
                                   overrides=overrides)
    prepare_from_hparams(hparams, hparams["emotion_classes"])
    manifests = iemocap_manifests(hparams)
    datasets = use_feature_cache(hparams, ser_datasets(manifests, hparams["emotion_classes"]))
    hparams["loss"].set_counts(class_counts(manifests["train"], hparams["emotion_classes"]))

    brain = AdaLTMBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
