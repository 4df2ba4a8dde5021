"""What every recipe's Brain needs around its model flow (the flow itself lives in each train.py).

- differential learning rates: ``opt_class`` for the head (and λ, α), ``backbone_opt_class`` for the modules
  (or sub-module paths such as ``speech_lm.encoder``) named in ``backbone_modules``; only parameters with
  ``requires_grad`` are given to an optimizer, a parameter shared by two modules once;
- a non-finite loss stops training at once with the batch's utterance ids, before any optimizer step or
  checkpoint, so NaN weights are never saved;
- checkpoint selection on the validation loss (best = lowest, the paper's selection rule);
- the global batch (``lobes.distributed``): micro-batch x ``grad_accumulation_factor`` x GPUs is checked and logged
  at start; once a process group exists, the ranks leave together (the exit hook).

The other jobs are small parts a Brain holds or calls: learning-rate schedules (``lobes.schedules``), loggers
and curves (``lobes.stage_logging``), sharded evaluation and gathering (``lobes.distributed.EvalShards``), and
per-utterance outputs with their metrics (``lobes.collectors``). A recipe's ``on_stage_end`` reads: train ->
``log_and_checkpoint``; valid -> ``gather`` its collectors, ``log_and_checkpoint`` with their ``summary``;
test -> ``gather``, ``write_test`` of ``run_record`` + the collectors' ``report``.
"""
import logging
import time
from pathlib import Path

import speechbrain as sb
import torch

from lobes import distributed as D
from lobes import stage_logging
from lobes.collectors import write_asr_predictions, write_ser_predictions
from lobes.errors import DataError
from lobes.results_io import write_metrics
from lobes.schedules import LRSchedules, size_schedules

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN/inf; names the batch so the culprit utterances can be found."""


class ToolkitBrain(sb.Brain):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            # SpeechBrain passes it to clip_grad_norm_, where a value <= 0 would zero or flip the gradients
            raise DataError(f"max_grad_norm: {self.max_grad_norm!r} must be > 0 (.inf: no clipping)")
        if D.is_distributed():
            D.finish_together_at_exit()
        self.shards = D.EvalShards()
        self.schedules = None  # built with the optimizers
        self._loggers, self._batch_ids, self.train_stats = None, [], None
        h = vars(self.hparams)
        if "batch_size" in h and "micro_batch_size" in h:  # a global batch (HarmoniFuse: per-task batches)
            self.batch_description = D.check_batch(h, self.grad_accumulation_factor)
            logger.info(self.batch_description)

    # -- optimisation ------------------------------------------------------------------------------------
    def init_optimizers(self):
        backbone_opt = self.hparams.backbone_opt_class
        backbone_ids = set()
        for path in self.hparams.backbone_modules:
            top, _, rest = path.partition(".")
            if top not in self.modules:
                raise DataError(f"backbone_modules: '{path}' names no module (modules: {list(self.modules)})")
            mod = self.modules[top]
            mod = mod.module if hasattr(mod, "module") else mod  # DDP wrapper
            mod = mod.get_submodule(rest) if rest else mod
            backbone_ids |= {id(p) for p in mod.parameters()}
        head, backbone = [], []
        for p in self.modules.parameters():  # de-duplicated: a shared parameter is optimised once
            if p.requires_grad:
                (backbone if id(p) in backbone_ids and backbone_opt is not None else head).append(p)
        self.optimizers_dict = {}
        if head:
            self.optimizer = self.opt_class(self.head_param_groups(head))
            self.optimizers_dict["opt_class"] = self.optimizer
        if backbone:
            self.backbone_optimizer = backbone_opt(backbone)
            self.optimizers_dict["backbone_opt_class"] = self.backbone_optimizer
        if self.checkpointer is not None:
            for name, opt in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(name, opt)
        self.schedules = LRSchedules(self.hparams.lr_schedulers, self.optimizers_dict, self.checkpointer)

    def head_param_groups(self, params):
        """What ``opt_class`` is given: the trainable non-backbone parameters, or a recipe's param groups."""
        return params

    def fit(self, epoch_counter, train_set, valid_set=None, progressbar=None, train_loader_kwargs=None,
            valid_loader_kwargs=None):
        """SpeechBrain's fit, with the schedules sized from the training loader and the curves plotted after."""
        train_loader_kwargs, valid_loader_kwargs = train_loader_kwargs or {}, valid_loader_kwargs or {}
        if not isinstance(train_set, (torch.utils.data.DataLoader, sb.dataio.dataloader.LoopedLoader)):
            train_set = self.make_dataloader(train_set, stage=sb.Stage.TRAIN, **train_loader_kwargs)
        h = self.hparams
        if h.lr_schedulers:
            steps = max(1, len(train_set) // self.grad_accumulation_factor)  # SpeechBrain steps every k-th batch
            size_schedules(h.lr_schedulers, steps, epoch_counter.limit, h.warmup_ratio)
        super().fit(epoch_counter, train_set, valid_set, progressbar=progressbar,
                    train_loader_kwargs=train_loader_kwargs, valid_loader_kwargs=valid_loader_kwargs)
        stage_logging.plot_curves(h.train_log, h.curves_plot, h.output_folder)

    def on_fit_start(self):
        """After the optimizers are built and a checkpoint is recovered: the loggers start (one that cannot fails
        before any training) and each optimizer takes its schedule's rate for the next step."""
        super().on_fit_start()
        self.loggers  # noqa: B018
        self.schedules.start()

    def on_fit_batch_start(self, batch, should_step):
        self._batch_ids = list(batch.id) if hasattr(batch, "id") else []

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:  # a per-step schedule counts optimizer steps, not accumulation micro-batches
            self.schedules.step()

    def check_loss_isfinite(self, loss):
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.step} of epoch "
                f"{self.hparams.epoch_counter.current}; batch utterances: {', '.join(self._batch_ids)}. "
                "Training stopped before the optimizer step; no checkpoint was written for it.")

    # -- logging -----------------------------------------------------------------------------------------
    @property
    def loggers(self):
        """The text logger, plus TensorBoard / W&B when the YAML switches them on (built once, on first use)."""
        if self._loggers is None:
            self._loggers = stage_logging.make_loggers(self.hparams)
        return self._loggers

    def log_stats(self, stats_meta, step=None, **stats):
        stage_logging.log_stats(self.loggers, stats_meta, step, **stats)

    # -- sharded evaluation (lobes.distributed.EvalShards) --------------------------------------------------
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Validation / test loaders run this rank's share of the single-process batches."""
        if stage != sb.Stage.TRAIN and not isinstance(dataset, torch.utils.data.IterableDataset):
            loader_kwargs = self.shards.loader_kwargs(stage, dataset, loader_kwargs)
        return super().make_dataloader(dataset, stage, ckpt_prefix=ckpt_prefix, **loader_kwargs)

    def evaluate_batch(self, batch, stage):
        loss = super().evaluate_batch(batch, stage)
        self.shards.add(loss, len(batch.id) if hasattr(batch, "id") else 1)
        return loss

    def on_stage_start(self, stage, epoch=None):
        self.shards.start()
        self._stage_t0 = time.perf_counter()
        self._stage = stage

    def gather(self, *collectors):
        """Every rank's rows of each collector in single-process order, checked to be the evaluated set (no
        drop, no duplicate); a stage whose loader the recipe built itself is not sharded: nothing to gather."""
        order = self.shards.order.get(self._stage)
        if order is None:
            return
        for c in collectors:
            c.gather(order)

    def stage_loss(self, stage, stage_loss):
        """Validation / test on a loader sharded by ``make_dataloader``: the sample-weighted mean of the batch
        losses over all ranks' utterances, in place of SpeechBrain's per-rank batch average. A stage whose loader
        the recipe built itself keeps the loss it passes."""
        if stage == sb.Stage.TRAIN or stage not in self.shards.order:
            return stage_loss
        return self.shards.mean()

    # -- stage ends: checkpoint selection and the test files -------------------------------------------------
    def log_and_checkpoint(self, stage, stage_loss, epoch, stats, gathered=False):
        """Train: keep the stage's statistics. Valid: log both, anneal, keep the lowest-validation-loss checkpoint.
        ``gathered``: ``stage_loss`` is already over every rank's utterances (HarmoniFuse's task-combined loss from
        its gathered batch losses), not to be replaced by ``stage_loss()``."""
        stage_loss = stage_loss if gathered else self.stage_loss(stage, stage_loss)
        stats = {"loss": stage_loss, **stats, "time_s": round(time.perf_counter() - self._stage_t0, 3)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        meta = {"epoch": epoch, **self.schedules.current_lrs()}  # lr of the last step, when scheduled
        self.log_stats(meta, step=epoch, train_stats=self.train_stats, valid_stats=stats)
        self.schedules.anneal(stage_loss)
        self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"],
                                             num_to_keep=self.hparams.ckpts_to_keep)

    def write_test(self, metrics, ser=None, confusion_title=None, asr=None):
        """Test: log, then (main process) metrics.json, for an SER collector predictions.csv and confusion.png, for
        an ASR collector asr_predictions.csv (the per-utterance transcripts of the paired WER test)."""
        self.log_stats({"Epoch loaded": self.hparams.epoch_counter.current},
                       test_stats=stage_logging.logged_test_stats(metrics))
        if not sb.utils.distributed.if_main_process():
            return metrics
        folder = Path(self.hparams.output_folder)
        write_metrics(folder / "metrics.json", metrics)
        if ser is not None and len(ser):
            from lobes.plots import plot_confusion

            write_ser_predictions(folder / "predictions.csv", ser)
            plot_confusion(metrics["test"]["confusion"], ser.classes, folder / "confusion.png", title=confusion_title)
        if asr is not None and len(asr):
            write_asr_predictions(folder / "asr_predictions.csv", asr)
        return metrics


def export_finetuned_backbone(encoder, out_dir):
    """Save a fine-tuned ``WavLMEncoder``'s WavLM as an HF directory (the W_ft of a task vector)."""
    import shutil

    out_dir = Path(out_dir)
    if not sb.utils.distributed.if_main_process():
        return out_dir
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = encoder.module.model if hasattr(encoder, "module") else encoder.model
    enc = encoder.module if hasattr(encoder, "module") else encoder
    state = enc.export_state() if hasattr(enc, "export_state") else None  # without training-only parameters
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def fit_and_evaluate(brain, datasets, hparams):
    """The common tail of every train.py: fit with validation, then test on the best (lowest-loss) checkpoint."""
    from lobes.dataio import loader_kwargs

    brain.fit(hparams["epoch_counter"], datasets["train"], datasets["valid"],
              train_loader_kwargs=loader_kwargs(hparams, datasets["train"], train=True),
              valid_loader_kwargs=loader_kwargs(hparams, datasets["valid"], train=False))
    return brain.evaluate(datasets["test"], min_key="loss",
                          test_loader_kwargs=loader_kwargs(hparams, datasets["test"], train=False))
