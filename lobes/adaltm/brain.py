"""What the AdaLTM recipes (recipes/MSP-Podcast/adaltm, recipes/IEMOCAP/adaltm) share around their model flow.

Each recipe's train.py keeps ``compute_forward`` / ``compute_objectives`` (the forward stays visible there) on top
of ``AdaLTMBrainBase``: per-kind weight decay (λ, α, head), λ means in the epoch log, λ in metrics.json, and
the test artifacts (coefficients.json, λ / α plots, the folded model). ``use_feature_cache`` swaps
audio for cached hidden states when nothing upstream of them trains.
"""
import json
import logging
from pathlib import Path

import speechbrain as sb
import torch

from lobes import distributed as D
from lobes import plots
from lobes.adaltm.feature_cache import cache_datasets, check_pooled_exact
from lobes.adaltm.fold_export import export_folded
from lobes.adaltm.layer_groups import group_names
from lobes.brains import ToolkitBrain
from lobes.io_utils import atomic_write

logger = logging.getLogger(__name__)


class AdaLTMBrainBase(ToolkitBrain):
    """ToolkitBrain with AdaLTM's optimizer groups, logs and artifacts; subclasses define the forward."""

    def head_param_groups(self, params):
        """One AdamW group per kind of trainable parameter, each with its YAML weight decay.

        λ (``lambda_weight_decay``), α (``alpha_weight_decay``) and the emotion head (``head_weight_decay``): AdamW's
        decoupled decay shrinks a parameter toward 0 by a factor (1 - lr·wd) per step, and λ = 0 is W_base, so a
        decay on λ would bias every row toward Setup 1 (see the MSP-Podcast AdaLTM README, "Weight decay").
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

    def lambda_means(self):
        """The mean λ per task vector, logged beside the validation statistics every epoch."""
        lam = self.hparams.wavlm.coefficients()
        return {f"λ_{k} mean": round(sum(v) / len(v), 4) for k, v in lam.items()}

    def lambda_record(self):
        """λ per group per task vector, for metrics.json; under DDP every rank also writes the λ it ended with to
        ``ranks/coefficients_rank<r>.json`` (DDP must keep them identical across ranks)."""
        coeffs = self.coefficients()
        if D.is_distributed():
            rank = torch.distributed.get_rank()
            with atomic_write(Path(self.hparams.output_folder) / "ranks" / f"coefficients_rank{rank}.json") as f:
                json.dump(coeffs, f)
        return coeffs["lambda"]

    def write_artifacts(self, run_title=None):
        """Main process: coefficients.json, λ / α plots and the folded model (folded_wavlm/). ``run_title`` names
        the run in the λ plot (default: the row, i.e. the output folder's parent)."""
        if not sb.utils.distributed.if_main_process():
            return
        h, coeffs, folder = self.hparams, self.coefficients(), Path(self.hparams.output_folder)
        with atomic_write(folder / "coefficients.json") as f:
            json.dump(coeffs, f, indent=2)
        if coeffs["lambda"]:
            run = run_title or folder.parent.name  # output folders end in <row>/<seed>
            plots.plot_lambdas(coeffs["lambda"], folder / "lambdas.png", title=f"λ per group — {run}")
        plots.plot_layer_weights({"α": coeffs["alpha"]}, folder / "alphas.png", title="α per layer", first_index=1)
        export_folded(h.wavlm, h.export_folder, {"weighted_sum": h.weighted_sum, "ser_head": h.ser_head},
                      {"classes": list(h.emotion_classes), "head_hidden": h.head_hidden, "pooling": h.pooling,
                       "head_type": h.ser_head.head_type,
                       "num_layers": h.wavlm.num_layers, "hidden_size": h.wavlm.hidden_size,
                       "include_cnn": h.weighted_sum.include_cnn, "layer_norm": h.weighted_sum.layer_norm,
                       "normalize_wav": h.wavlm.normalize_wav})


def use_feature_cache(hparams, datasets, device="cpu"):
    """Swap audio for cached hidden states when nothing upstream of them is trained (lobes/adaltm/feature_cache.py).

    Arguments
    ---------
    hparams : dict
        The recipe's hparams (``wavlm``, ``cache_features``, ``cache_dtype`` and the ``feature_cache_*`` keys).
    datasets : dict
        Split name -> DynamicItemDataset with audio; changed in place to give ``feats`` instead.
    device : str
        Where the static backbone runs while the caches are built.

    Returns
    -------
    dict
        ``datasets``, cached or, for a trained λ, ``cache_features: False`` or an over-budget cache with
        ``feature_cache_over_budget: recompute``, unchanged.
    """
    wavlm = hparams["wavlm"]
    static = wavlm.num_vectors == 0 or not wavlm.lambdas.lam.requires_grad
    if not (hparams["cache_features"] and static):
        return datasets
    pooled = hparams["feature_cache_pooled"]
    if pooled:
        check_pooled_exact(hparams["weighted_sum"], hparams["ser_head"])
    wavlm.to(device)  # built on the training device, before the Brain moves the modules there
    caches = cache_datasets(hparams, datasets, device)  # every split planned and budget-checked before any is built
    if caches is None:  # over budget, feature_cache_over_budget: recompute
        return datasets
    for split, ds in datasets.items():
        ds.add_dynamic_item(caches[split].pipeline())
        ds.set_output_keys(["id", "feats", "emo_idx", "soft_label", "spk_id"])
    return datasets
