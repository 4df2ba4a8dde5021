#!/usr/bin/env python3
"""AdaLTM: train λ (eq. 4), α (eq. 5) and the emotion head on a frozen, task-vector-merged WavLM.

    python train.py hparams/rows/setup4_dual.yaml --data_folder /path/to/MSP-Podcast \
        --wavlm_source microsoft/wavlm-large --vectors_folder exp/adaltm/task_vectors
    torchrun --nproc_per_node=2 train.py hparams/rows/setup4_dual.yaml ...

Writes to the output folder: metrics.json (UAR / precision / MaF1 with 95% CIs), coefficients.json (λ per
group per vector, α per layer), λ / α / confusion plots, and the folded model (folded_wavlm/).
"""
import json
import logging
import sys
from pathlib import Path

import speechbrain as sb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msp_podcast_prepare import msp_manifests, prepare_msp_podcast  # noqa: E402

from lobes import plots  # noqa: E402
from lobes.brains import ToolkitBrain, fit_and_evaluate  # noqa: E402
from lobes.dataio import class_counts, ser_datasets  # noqa: E402
from lobes.adaltm.feature_cache import (CacheBudgetError, FeatureCache, cached_hidden,  # noqa: E402
                                        check_pooled_exact, dataset_source, spec_for)
from lobes.adaltm.fold_export import export_folded  # noqa: E402
from lobes.hparams_io import load_hparams  # noqa: E402
from lobes.io_utils import atomic_write  # noqa: E402
from lobes.adaltm.layer_groups import group_names  # noqa: E402

logger = logging.getLogger(__name__)


class AdaLTMBrain(ToolkitBrain):
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
            self.collect_ser(batch, logits)
        return self.hparams.loss(logits, batch.soft_label.data)

    def head_param_groups(self, params):
        """One AdamW group per kind of trainable parameter, each with its YAML weight decay.

        λ (``lambda_weight_decay``), α (``alpha_weight_decay``) and the emotion head (``head_weight_decay``): AdamW's
        decoupled decay shrinks a parameter toward 0 by a factor (1 - lr·wd) per step, and λ = 0 is W_base, so a
        decay on λ would bias every row toward Setup 1 (see the README, "Weight decay").
        """
        h = self.hparams
        owner = {id(p): "lambda" for p in self.modules["wavlm"].parameters()}
        owner.update({id(p): "alpha" for p in self.modules["weighted_sum"].parameters()})
        decay = {"lambda": h.lambda_weight_decay, "alpha": h.alpha_weight_decay, "head": h.head_weight_decay}
        groups = {name: [] for name in decay}
        for p in params:
            groups[owner.get(id(p), "head")].append(p)
        return [{"params": ps, "weight_decay": decay[name], "name": name} for name, ps in groups.items() if ps]

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
        coeffs = self.coefficients()
        out = self.write_test_metrics(stage_loss, {"lambdas": coeffs["lambda"], "alphas": coeffs["alpha"]})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank records the λ it ended with: DDP must keep them identical across ranks
            rank = torch.distributed.get_rank()
            with atomic_write(Path(self.hparams.output_folder) / "ranks" / f"coefficients_rank{rank}.json") as f:
                json.dump(coeffs, f)
        if sb.utils.distributed.if_main_process():
            self.write_artifacts(coeffs, out)

    def write_artifacts(self, coeffs, metrics):
        folder = Path(self.hparams.output_folder)
        with atomic_write(folder / "coefficients.json") as f:
            json.dump(coeffs, f, indent=2)
        if coeffs["lambda"]:
            plots.plot_lambdas(coeffs["lambda"], folder / "lambdas.png", title=f"λ per group — {folder.parent.name}")
        plots.plot_layer_weights({"α": coeffs["alpha"]}, folder / "alphas.png", title="α per layer",
                                 first_index=1)
        plots.plot_confusion(metrics["test"]["confusion"], self.classes, folder / "confusion.png")
        h = self.hparams
        export_folded(h.wavlm, h.export_folder, {"weighted_sum": h.weighted_sum, "ser_head": h.ser_head},
                      {"classes": self.classes, "head_hidden": h.head_hidden, "pooling": h.pooling,
                       "head_type": h.ser_head.head_type,
                       "num_layers": h.wavlm.num_layers, "hidden_size": h.wavlm.hidden_size,
                       "include_cnn": h.weighted_sum.include_cnn, "layer_norm": h.weighted_sum.layer_norm,
                       "normalize_wav": h.wavlm.normalize_wav})


def use_feature_cache(hparams, datasets, device="cpu"):
    """Swap audio for cached hidden states when nothing upstream of them is trained (lobes/adaltm/feature_cache.py)."""
    wavlm = hparams["wavlm"]
    static = wavlm.num_vectors == 0 or not wavlm.lambdas.lam.requires_grad
    if not (hparams["cache_features"] and static):
        return datasets
    pooled = hparams["feature_cache_pooled"]
    if pooled:
        check_pooled_exact(hparams["weighted_sum"], hparams["ser_head"])
    spec = spec_for(wavlm, hparams["cache_dtype"], pooled)
    wavlm.to(device)  # built on the training device, before the Brain moves the modules there
    caches = {}
    for split, ds in datasets.items():
        utterances, load = dataset_source(ds)
        try:
            caches[split] = FeatureCache.build(
                wavlm, utterances, load, spec, split, hparams["feature_cache_dir"], device,
                hparams["feature_cache_batch_seconds"], hparams["feature_cache_shard_mb"],
                hparams["feature_cache_max_ram_gb"], hparams["feature_cache_max_disk_gb"])
        except CacheBudgetError as e:
            if hparams["feature_cache_over_budget"] != "recompute":
                raise
            logger.warning("%s -- feature_cache_over_budget: recompute, so WavLM runs on every batch", e)
            return datasets
    for split, ds in datasets.items():
        ds.add_dynamic_item(caches[split].pipeline())
        ds.set_output_keys(["id", "feats", "emo_idx", "soft_label", "spk_id"])
    return datasets


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    hparams, base_file, overrides = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=base_file,
                                   overrides=overrides)
    if not hparams["skip_prep"]:
        sb.utils.distributed.run_on_main(prepare_msp_podcast, kwargs={
            "data_folder": hparams["data_folder"], "save_folder": hparams["prep_folder"],
            "transcript_only": hparams["transcript_only"], "test_splits": hparams["test_splits"],
            "classes": hparams["emotion_classes"]})
    manifests = msp_manifests(hparams)
    device = run_opts.get("device") or sb.utils.distributed.infer_device()
    datasets = use_feature_cache(hparams, ser_datasets(manifests, hparams["emotion_classes"]), device)
    hparams["loss"].set_counts(class_counts(manifests["train"], hparams["emotion_classes"]))

    brain = AdaLTMBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])
    fit_and_evaluate(brain, datasets, hparams)
