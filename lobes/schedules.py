"""Learning-rate schedules of a Brain's optimizers (the YAML's ``lr_schedulers``).

``lr_schedulers`` maps an optimizer name (``opt_class``: the head, ``backbone_opt_class``: the backbone) to a
SpeechBrain scheduler declared in the YAML and listed in the checkpointer's recoverables, so a resumed run
continues its schedule. ``LinearWarmupScheduler`` advances after every optimizer step (its step counts, when null
in the YAML, come from ``warmup_ratio`` and epochs x optimizer steps per epoch: :func:`size_schedules`);
``NewBobScheduler`` anneals after every validation, on the validation loss. Either sets every param group of its
optimizer to the same rate. A null entry, or ``lr_schedulers: {}``, trains at constant learning rates.
"""
import logging
import math

import speechbrain as sb
from speechbrain.nnet.schedulers import LinearWarmupScheduler, NewBobScheduler

from lobes.errors import DataError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("opt_class", "backbone_opt_class")
LOG_NAMES = {"opt_class": "lr", "backbone_opt_class": "lr_backbone"}  # their names in the epoch log


def size_schedules(declared, steps_per_epoch, epochs, warmup_ratio):
    """Fill a ``LinearWarmupScheduler``'s null step counts: ``epochs`` x ``steps_per_epoch`` optimizer steps,
    the first ``warmup_ratio`` of them warming up (a checkpoint's saved counts replace these on resume)."""
    for name, sched in declared.items():
        if not isinstance(sched, LinearWarmupScheduler):  # also None: switched off
            continue
        if sched.num_training_steps is None:
            sched.num_training_steps = epochs * steps_per_epoch
        if sched.num_warmup_steps is None:
            sched.num_warmup_steps = math.ceil(warmup_ratio * sched.num_training_steps)
        logger.info("lr_schedulers.%s: linear warm-up over %d of %d optimizer steps to %.3g, then linear decay",
                    name, sched.num_warmup_steps, sched.num_training_steps, sched.lr0)


def scheduled_lr(sched):
    """The learning rate a scheduler gives the next optimizer step (None: the schedule has no length yet)."""
    if isinstance(sched, NewBobScheduler):
        return sched.hyperparam_value
    if sched.num_training_steps is None or sched.num_warmup_steps is None:
        return None
    return sched.calculate_lr(sched.current_step)


class LRSchedules:
    """The declared schedules of the optimizers that exist (a frozen backbone has no backbone optimizer)."""

    def __init__(self, declared, optimizers, checkpointer):
        check_schedules(declared, optimizers, checkpointer)
        self.optimizers = optimizers
        self.active = {n: s for n, s in declared.items() if s is not None and n in optimizers}

    def start(self):
        """Each optimizer takes its schedule's rate for the next step (step 0 of a linear warm-up: 0, as HF's; a
        resumed run: where it stopped)."""
        for name, sched in self.active.items():
            lr = scheduled_lr(sched)
            if lr is None:
                logger.warning("lr_schedulers.%s: step counts unknown (fit() not used); learning rate left constant",
                               name)
                continue
            for group in self.optimizers[name].param_groups:
                group["lr"] = lr

    def step(self):
        """After an optimizer step (not after an accumulation micro-batch): per-step schedules advance."""
        for name, sched in self.active.items():
            if isinstance(sched, LinearWarmupScheduler) and scheduled_lr(sched) is not None:
                sched(self.optimizers[name])

    def anneal(self, valid_loss):
        """NewBob: anneal after a validation whose loss improved too little (SpeechBrain's wav2vec recipes)."""
        for name, sched in self.active.items():
            if isinstance(sched, NewBobScheduler):
                _, new_lr = sched(valid_loss)
                sb.nnet.schedulers.update_learning_rate(self.optimizers[name], new_lr)

    def current_lrs(self):
        """{"lr": head rate, "lr_backbone": backbone rate} when a schedule runs (else {}: constant rates)."""
        if not self.active:
            return {}
        return {LOG_NAMES[n]: opt.param_groups[0]["lr"] for n, opt in self.optimizers.items()}


def check_schedules(declared, optimizers, checkpointer):
    """DataError for a schedule of an unknown optimizer, of an unsupported kind, or outside the checkpointer."""
    saved = set(map(id, checkpointer.recoverables.values())) if checkpointer is not None else set()
    for name, sched in declared.items():
        if sched is None:  # switched off, e.g. --lr_schedulers="{opt_class: null}": a constant learning rate
            continue
        if name not in OPTIMIZERS:
            raise DataError(f"lr_schedulers: '{name}' names no optimizer (use {OPTIMIZERS})")
        if not isinstance(sched, (LinearWarmupScheduler, NewBobScheduler)):
            raise DataError(f"lr_schedulers.{name}: {type(sched).__name__} is not supported (LinearWarmupScheduler "
                            "per optimizer step, NewBobScheduler per epoch on the validation loss)")
        if checkpointer is not None and id(sched) not in saved:
            raise DataError(f"lr_schedulers.{name} is not in the checkpointer's recoverables: a resumed run "
                            "would restart its schedule")
        if name not in optimizers:
            logger.warning("lr_schedulers.%s: no such optimizer (nothing trainable for it); not used", name)
