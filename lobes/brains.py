"""Train-loop infrastructure shared by every recipe's Brain subclass (the model flow itself lives in each train.py).

- differential learning rates: ``opt_class`` for the head (and λ, α), ``backbone_opt_class`` for the modules
  (or sub-module paths such as ``speech_lm.encoder``) named in ``backbone_modules``; only parameters with
  ``requires_grad`` are given to an optimizer, a parameter shared by two modules once;
- a non-finite loss stops training at once with the batch's utterance ids, before any optimizer step or
  checkpoint, so NaN weights are never saved;
- SER / ASR output collection, the ``metrics.json`` and ``predictions.csv`` writers used by every recipe's test
  stage; the class names come from the recipe's ``emotion_classes``;
- checkpointing on the validation loss (best = lowest, the paper's selection rule);
- the stage-end tail (``on_stage_end``): recipes adapt it through ``epoch_stats``, ``test_extras`` and
  ``write_artifacts`` (default: ``confusion.png`` of an SER test); a YAML with ``fold`` records ``experiment`` and
  ``fold`` in metrics.json, one with a ``weighted_sum`` its α;
- multi-GPU semantics (``lobes.distributed``): ``batch_size`` is the global batch (micro-batch x
  ``grad_accumulation_factor`` x GPUs, checked and logged at start); validation and test are sharded across
  DDP ranks, outputs gathered back into single-process order and the stage loss is the sample-weighted mean
  over all ranks, so metrics do not depend on the GPU count;
- learning-rate schedules (``lr_schedulers``: optimizer name -> SpeechBrain scheduler declared in the YAML and
  listed in the checkpointer's recoverables, so a resumed run continues its schedule):
  ``LinearWarmupScheduler`` is applied after every optimizer step (its step counts, when null in the YAML,
  come from ``warmup_ratio`` and ``number_of_epochs`` x optimizer steps per epoch at the start of ``fit``),
  ``NewBobScheduler`` after every validation, on the validation loss (either sets every param group of its
  optimizer to the same rate); a null entry, or a recipe without the key, trains at constant learning rates;
- live curves: every ``log_stats`` goes to ``train_logger`` (text) and, when switched on in the YAML, to
  SpeechBrain's TensorBoard logger (``use_tensorboard``) and W&B (``use_wandb``, needs wandb installed);
  at the end of ``fit`` the per-epoch losses and metrics of ``train_log.txt`` are drawn into ``curves_plot``.
"""
import logging
import math
import time
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.nnet.schedulers import LinearWarmupScheduler, NewBobScheduler

from lobes import distributed as D
from lobes import metrics as M
from lobes.errors import DataError

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN/inf; names the batch so the culprit utterances can be found."""


class ToolkitBrain(sb.Brain):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        h = vars(self.hparams) if getattr(self, "hparams", None) is not None else {}
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            # SpeechBrain passes it to clip_grad_norm_, where a value <= 0 would zero or flip the gradients
            raise DataError(f"max_grad_norm: {self.max_grad_norm!r} must be > 0 (.inf: no clipping)")
        if D.is_distributed():
            D.finish_together_at_exit()
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
        self._check_schedulers()

    # -- learning-rate schedules -------------------------------------------------------------------------
    @property
    def lr_schedulers(self):
        """{optimizer name: scheduler} of the YAML's ``lr_schedulers`` whose optimizer exists (a frozen
        backbone has no backbone optimizer)."""
        declared = getattr(self.hparams, "lr_schedulers", None) or {}
        return {n: s for n, s in declared.items() if s is not None and n in getattr(self, "optimizers_dict", {})}

    def _check_schedulers(self):
        declared = getattr(self.hparams, "lr_schedulers", None) or {}
        known = ("opt_class", "backbone_opt_class")
        saved = set(map(id, self.checkpointer.recoverables.values())) if self.checkpointer is not None else set()
        for name, sched in declared.items():
            if sched is None:  # switched off, e.g. --lr_schedulers="{opt_class: null}": a constant learning rate
                continue
            if name not in known:
                raise DataError(f"lr_schedulers: '{name}' names no optimizer (use {known})")
            if not isinstance(sched, (LinearWarmupScheduler, NewBobScheduler)):
                raise DataError(f"lr_schedulers.{name}: {type(sched).__name__} is not supported (LinearWarmupScheduler "
                                "per optimizer step, NewBobScheduler per epoch on the validation loss)")
            if self.checkpointer is not None and id(sched) not in saved:
                raise DataError(f"lr_schedulers.{name} is not in the checkpointer's recoverables: a resumed run "
                                "would restart its schedule")
            if name not in self.optimizers_dict:
                logger.warning("lr_schedulers.%s: no such optimizer (nothing trainable for it); not used", name)

    def size_schedules(self, steps_per_epoch, epochs):
        """Fill a ``LinearWarmupScheduler``'s null step counts: ``epochs`` x ``steps_per_epoch`` optimizer steps,
        the first ``warmup_ratio`` of them warming up (a checkpoint's saved counts replace these on resume)."""
        for name, sched in (getattr(self.hparams, "lr_schedulers", None) or {}).items():
            if not isinstance(sched, LinearWarmupScheduler):  # also None: switched off
                continue
            if sched.num_training_steps is None:
                sched.num_training_steps = epochs * steps_per_epoch
            if sched.num_warmup_steps is None:
                sched.num_warmup_steps = math.ceil(self.hparams.warmup_ratio * sched.num_training_steps)
            logger.info("lr_schedulers.%s: linear warm-up over %d of %d optimizer steps to %.3g, then linear decay",
                        name, sched.num_warmup_steps, sched.num_training_steps, sched.lr0)

    @staticmethod
    def scheduled_lr(sched):
        """The learning rate a scheduler gives the next optimizer step (None: the schedule has no length yet)."""
        if isinstance(sched, NewBobScheduler):
            return sched.hyperparam_value
        if sched.num_training_steps is None or sched.num_warmup_steps is None:
            return None
        return sched.calculate_lr(sched.current_step)

    def on_fit_start(self):
        """After the optimizers are built and a checkpoint is recovered: each optimizer takes its schedule's
        learning rate for the next step (step 0 of a linear warm-up: 0, as HF's; a resumed run: where it stopped)."""
        super().on_fit_start()
        self.loggers  # noqa: B018 -- built now, so a logger that cannot start fails before any training
        for name, sched in self.lr_schedulers.items():
            lr = self.scheduled_lr(sched)
            if lr is None:
                logger.warning("lr_schedulers.%s: step counts unknown (fit() not used); learning rate left constant",
                               name)
                continue
            for group in self.optimizers_dict[name].param_groups:
                group["lr"] = lr

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """A per-step schedule advances after every optimizer step (not after an accumulation micro-batch)."""
        if not should_step:
            return
        for name, sched in self.lr_schedulers.items():
            if isinstance(sched, LinearWarmupScheduler) and self.scheduled_lr(sched) is not None:
                sched(self.optimizers_dict[name])

    def anneal_on_valid(self, valid_loss):
        """NewBob: anneal after a validation whose loss improved too little (SpeechBrain's wav2vec recipes)."""
        for name, sched in self.lr_schedulers.items():
            if isinstance(sched, NewBobScheduler):
                _, new_lr = sched(valid_loss)
                sb.nnet.schedulers.update_learning_rate(self.optimizers_dict[name], new_lr)

    def current_lrs(self):
        """{"lr": head learning rate, "lr_backbone": backbone learning rate} of the existing optimizers."""
        names = {"opt_class": "lr", "backbone_opt_class": "lr_backbone"}
        return {names[n]: opt.param_groups[0]["lr"] for n, opt in getattr(self, "optimizers_dict", {}).items()}

    # -- logging -----------------------------------------------------------------------------------------
    @property
    def loggers(self):
        """The text logger, plus TensorBoard / W&B when the YAML switches them on (built once, on first use)."""
        if getattr(self, "_loggers", None) is None:
            h = self.hparams
            self._loggers = [h.train_logger]
            if getattr(h, "use_tensorboard", False):
                self._loggers.append(h.tensorboard_logger())
            if getattr(h, "use_wandb", False):
                try:
                    import wandb
                except ImportError as e:
                    raise DataError("use_wandb: True, but wandb is not installed (pip install wandb)") from e
                self._loggers.append(sb.utils.train_logger.WandBLogger(
                    initializer=wandb.init, project=h.wandb_project, name=Path(h.output_folder).name,
                    dir=str(Path(h.output_folder)), resume="allow"))
        return self._loggers

    def log_stats(self, stats_meta, step=None, **stats):
        """One ``log_stats`` to every logger. ``step`` (the epoch) is TensorBoard's x value, so a resumed run's
        points continue the curves instead of restarting at 1."""
        for lg in self.loggers:
            if step is not None and isinstance(getattr(lg, "global_step", None), dict):
                lg.global_step["meta"] = step - 1
                for stage in ("train", "valid", "test"):
                    lg.global_step[stage] = {k: step - 1 for k in lg.global_step[stage]} | {
                        k: step - 1 for k in (stats.get(f"{stage}_stats") or {})}
            lg.log_stats(stats_meta=stats_meta, **stats)

    def fit(self, epoch_counter, train_set, valid_set=None, progressbar=None, train_loader_kwargs=None,
            valid_loader_kwargs=None):
        """SpeechBrain's fit, with the schedules sized from the training loader and the curves plotted after."""
        train_loader_kwargs, valid_loader_kwargs = train_loader_kwargs or {}, valid_loader_kwargs or {}
        if not isinstance(train_set, (torch.utils.data.DataLoader, sb.dataio.dataloader.LoopedLoader)):
            train_set = self.make_dataloader(train_set, stage=sb.Stage.TRAIN, **train_loader_kwargs)
        if getattr(self.hparams, "lr_schedulers", None):
            steps = max(1, len(train_set) // self.grad_accumulation_factor)  # SpeechBrain steps every k-th batch
            self.size_schedules(steps, epoch_counter.limit)
        super().fit(epoch_counter, train_set, valid_set, progressbar=progressbar,
                    train_loader_kwargs=train_loader_kwargs, valid_loader_kwargs=valid_loader_kwargs)
        self.plot_curves()

    def plot_curves(self):
        """Train / valid loss and the task metric per epoch, from ``train_log.txt``, into ``curves_plot``."""
        path = getattr(self.hparams, "curves_plot", None)
        if not path or not sb.utils.distributed.if_main_process():
            return
        from lobes.plots import plot_training_curves

        try:
            plot_training_curves(self.hparams.train_log, path, title=Path(self.hparams.output_folder).name)
        except DataError as e:  # a plot must not fail a finished training run
            logger.warning("training curves not drawn: %s", e)

    def head_param_groups(self, params):
        """What ``opt_class`` is given: the trainable non-backbone parameters, or a recipe's param groups."""
        return params

    def on_fit_batch_start(self, batch, should_step):
        self._batch_ids = list(getattr(batch, "id", []))

    def check_loss_isfinite(self, loss):
        if not torch.isfinite(loss):
            ids = getattr(self, "_batch_ids", [])
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.step} of epoch "
                f"{getattr(self.hparams.epoch_counter, 'current', '?')}; batch utterances: {', '.join(ids)}. "
                "Training stopped before the optimizer step; no checkpoint was written for it.")

    # -- sharded evaluation ------------------------------------------------------------------------------
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Validation / test loaders run this rank's share of the single-process batches (lobes.distributed)."""
        if stage != sb.Stage.TRAIN and not isinstance(dataset, torch.utils.data.IterableDataset):
            loader_kwargs, order = D.shard_batches(dataset, loader_kwargs)
            self._eval_order = getattr(self, "_eval_order", {})
            self._eval_order[stage] = order
        return super().make_dataloader(dataset, stage, ckpt_prefix=ckpt_prefix, **loader_kwargs)

    def evaluate_batch(self, batch, stage):
        loss = super().evaluate_batch(batch, stage)
        n = len(batch.id) if hasattr(batch, "id") else 1
        self._eval_loss_sum += float(loss) * n  # the stage loss is a sample-weighted mean (equal for any sharding)
        self._eval_count += n
        return loss

    def sync_outputs(self):
        """Once per stage, on every rank: all ranks' SER / ASR outputs, in single-process order."""
        if self._synced or not D.is_distributed() or self._stage == sb.Stage.TRAIN:
            return
        if self._stage not in getattr(self, "_eval_order", {}):
            # a DataLoader built by the recipe (HarmoniFuse's interleaved loaders): every rank ran all of it
            logger.warning("%s loader was not sharded (built outside make_dataloader): outputs not gathered",
                           self._stage.name)
            return
        self._synced = True
        order = self._eval_order[self._stage]
        self.ser_out = D.gather_rows(self.ser_out, order)
        self.asr_out = D.gather_rows(self.asr_out, order)

    def stage_loss(self, stage, stage_loss):
        """Validation / test on a loader sharded by ``make_dataloader``: the sample-weighted mean of the batch
        losses over all ranks' utterances, in place of SpeechBrain's per-rank batch average. A stage whose loader
        the recipe built itself (HarmoniFuse: its own task-combined loss) keeps the loss it passes."""
        if stage == sb.Stage.TRAIN or stage not in getattr(self, "_eval_order", {}):
            return stage_loss
        return D.weighted_mean(self._eval_loss_sum, self._eval_count)

    # -- output collection -------------------------------------------------------------------------------
    @property
    def classes(self):
        """The recipe's emotion class names (``emotion_classes`` in its YAML), in label-index order."""
        return list(self.hparams.emotion_classes)

    def reset_outputs(self):
        self.ser_out = {"ids": [], "true": [], "pred": [], "spk": [], "prob": []}
        self.asr_out = {"ids": [], "refs": [], "hyps": []}

    def collect_ser(self, batch, logits):
        probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
        self.ser_out["ids"] += list(batch.id)
        self.ser_out["true"] += batch.emo_idx.data.view(-1).cpu().tolist()
        self.ser_out["pred"] += probs.argmax(-1).tolist()
        self.ser_out["prob"] += probs.tolist()
        spk = getattr(batch, "spk_id", None)
        self.ser_out["spk"] += list(spk) if spk is not None else []

    def collect_asr(self, batch, hyps):
        self.asr_out["ids"] += list(batch.id)
        self.asr_out["refs"] += list(batch.wrd)
        self.asr_out["hyps"] += list(hyps)

    def ser_stats(self, with_ci=False):
        self.sync_outputs()
        if not self.ser_out["true"]:
            return {}
        if not with_ci:
            m = M.ser_metrics(self.ser_out["true"], self.ser_out["pred"], len(self.classes))
            return {"UAR": round(100 * m["uar"], 2), "MaF1": round(100 * m["macro_f1"], 2)}
        h = self.hparams
        speakers = self.ser_out["spk"] if h.speaker_bootstrap else None
        return M.ser_report(self.ser_out["true"], self.ser_out["pred"], speakers=speakers,
                            num_bootstraps=h.num_bootstraps, n_classes=len(self.classes), seed=h.seed)

    def asr_wer(self):
        self.sync_outputs()
        return M.wer(self.asr_out["refs"], self.asr_out["hyps"]) if self.asr_out["refs"] else None

    # -- stage ends ----------------------------------------------------------------------------------------
    def on_stage_start(self, stage, epoch=None):
        self.reset_outputs()
        self._stage, self._synced = stage, False
        self._eval_loss_sum, self._eval_count = 0.0, 0
        self._stage_t0 = time.perf_counter()

    def stage_stats(self):
        """Validation statistics of what was collected: UAR / MaF1 (SER) and WER (ASR)."""
        stats = self.ser_stats()
        w = self.asr_wer()
        if w is not None:
            stats["WER"] = round(100 * w, 2)
        return stats

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Train / valid: log ``epoch_stats``, keep the lowest-validation-loss checkpoint. Test: metrics.json
        (+ predictions.csv) with ``test_extras``, then ``write_artifacts`` on the main process.

        A recipe changes what is logged, recorded or written through these three hooks, not by copying this."""
        if stage != sb.Stage.TEST:
            return self.log_and_checkpoint(stage, stage_loss, epoch, self.epoch_stats(stage))
        out = self.write_test_metrics(stage_loss, self.test_extras())
        if sb.utils.distributed.if_main_process():
            self.write_artifacts(out)
        return out

    def epoch_stats(self, stage):
        """Statistics logged beside the stage loss: none for training, ``stage_stats`` for validation."""
        return {} if stage == sb.Stage.TRAIN else self.stage_stats()

    def test_extras(self):
        """Entries a recipe adds to metrics.json (called on every rank, before it is written)."""
        return {}

    def write_artifacts(self, metrics):
        """Main process, after metrics.json: the confusion plot of an SER test stage (``confusion.png``)."""
        if "test" not in metrics:
            return
        from lobes.plots import plot_confusion

        run = self.fold_title()
        plot_confusion(metrics["test"]["confusion"], self.classes, Path(self.hparams.output_folder) / "confusion.png",
                       title=f"{run} (test Session {self.hparams.fold})" if run else None)

    def fold_title(self):
        """"<experiment>, fold <k>" for a leave-one-session-out recipe (``fold`` in its YAML), else None."""
        fold = getattr(self.hparams, "fold", None)
        return None if fold is None else f"{self.hparams.experiment}, fold {fold}"

    def log_and_checkpoint(self, stage, stage_loss, epoch, stats):
        """Validation: log and keep the checkpoint with the lowest validation loss."""
        self.sync_outputs()
        stage_loss = self.stage_loss(stage, stage_loss)
        stats = {"loss": stage_loss, **stats}
        if getattr(self, "_stage_t0", None) is not None:  # wall seconds of the stage, in train_log.txt
            stats["time_s"] = round(time.perf_counter() - self._stage_t0, 3)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        if stage == sb.Stage.VALID:
            meta = {"epoch": epoch, **(self.current_lrs() if self.lr_schedulers else {})}  # lr of the last step
            self.log_stats(meta, step=epoch, train_stats=getattr(self, "train_stats", None), valid_stats=stats)
            self.anneal_on_valid(stage_loss)
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"],
                                                 num_to_keep=self.hparams.ckpts_to_keep)

    def write_test_metrics(self, stage_loss, extra=None):
        """Test stage: metrics with 95% CIs (and WER) to ``<output_folder>/metrics.json`` (rank 0 only)."""
        self.sync_outputs()
        stage_loss = self.stage_loss(sb.Stage.TEST, stage_loss)
        h = self.hparams
        out = {"experiment": Path(h.output_folder).name, "test_loss": float(stage_loss)}
        if getattr(h, "fold", None) is not None:  # leave-one-session-out: average_folds.py groups by both
            out.update(experiment=h.experiment, fold=h.fold)
        for key in ("table_rows", "part", "row", "order"):
            if getattr(h, key, None) is not None:
                out[key] = getattr(h, key)
        if getattr(h, "weighted_sum", None) is not None:  # the module itself, not a DDP wrapper
            out["alphas"] = h.weighted_sum.alpha().tolist()
        if self.ser_out["true"]:
            out["test"] = {**self.ser_stats(with_ci=True), "n": len(self.ser_out["true"]),
                           "classes": self.classes}
        w = None
        if self.asr_out["refs"]:  # the point WER comes with its interval, from one scoring pass
            w, ci = M.wer_ci(self.asr_out["refs"], self.asr_out["hyps"], getattr(h, "num_bootstraps", 1000),
                             seed=getattr(h, "seed", 0))
            out["wer"], out["wer_ci"] = w, ci
            # the same hypotheses scored after Whisper's English normaliser, as ASR papers report it
            out["wer_whisper_norm"] = M.wer_whisper_norm(self.asr_out["refs"], self.asr_out["hyps"])
            out["asr_examples"] = [{"id": i, "ref": r, "hyp": h} for i, r, h in
                                   list(zip(*self.asr_out.values()))[:5]]
        out.update(extra or {})
        self.log_stats(
            {"Epoch loaded": self.hparams.epoch_counter.current},
            test_stats={"loss": stage_loss, **({"UAR": out["test"]["uar"]} if "test" in out else {}),
                        **({"WER": w} if w is not None else {})})
        if sb.utils.distributed.if_main_process():
            M.write_metrics(Path(self.hparams.output_folder) / "metrics.json", out)
            if self.ser_out["true"]:
                self.write_predictions()
        return out

    def write_predictions(self):
        """Per-utterance predictions (id, true, predicted, class probabilities) as CSV, for error analysis."""
        from lobes.io_utils import atomic_write

        with atomic_write(Path(self.hparams.output_folder) / "predictions.csv") as f:
            classes = self.classes
            f.write("id,true,pred," + ",".join(classes) + "\n")
            for i, t, p, prob in zip(self.ser_out["ids"], self.ser_out["true"], self.ser_out["pred"],
                                     self.ser_out["prob"]):
                f.write(f"{i},{classes[t]},{classes[p]}," + ",".join(f"{x:.6f}" for x in prob) + "\n")


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
