"""Where a Brain's per-stage statistics go: the text ``train_logger``, and, when the YAML switches them on,
SpeechBrain's TensorBoard logger (``use_tensorboard``) and W&B (``use_wandb``, needs wandb installed); at the end
of ``fit`` the per-epoch losses and metrics of ``train_log.txt`` are drawn into ``curves_plot``."""
import logging
from pathlib import Path

import speechbrain as sb

from lobes.errors import DataError

logger = logging.getLogger(__name__)


def make_loggers(hparams):
    """The text logger, plus TensorBoard / W&B when ``use_tensorboard`` / ``use_wandb`` say so."""
    loggers = [hparams.train_logger]
    if hparams.use_tensorboard:
        loggers.append(hparams.tensorboard_logger())
    if hparams.use_wandb:
        try:
            import wandb
        except ImportError as e:
            raise DataError("use_wandb: True, but wandb is not installed (pip install wandb)") from e
        loggers.append(sb.utils.train_logger.WandBLogger(
            initializer=wandb.init, project=hparams.wandb_project, name=Path(hparams.output_folder).name,
            dir=str(Path(hparams.output_folder)), resume="allow"))
    return loggers


def log_stats(loggers, stats_meta, step=None, **stats):
    """One ``log_stats`` to every logger. ``step`` (the epoch) is TensorBoard's x value, so a resumed run's
    points continue the curves instead of restarting at 1."""
    for lg in loggers:
        if step is not None and isinstance(getattr(lg, "global_step", None), dict):  # TensorBoard's counters
            lg.global_step["meta"] = step - 1
            for stage in ("train", "valid", "test"):
                lg.global_step[stage] = {k: step - 1 for k in lg.global_step[stage]} | {
                    k: step - 1 for k in (stats.get(f"{stage}_stats") or {})}
        lg.log_stats(stats_meta=stats_meta, **stats)


def plot_curves(train_log, path, output_folder):
    """Train / valid loss and the task metric per epoch, from ``train_log``, into ``path`` (null: none); main
    process only. A plot that cannot be drawn is a warning: it must not fail a finished training run."""
    if not path or not sb.utils.distributed.if_main_process():
        return
    from lobes.plots import plot_training_curves

    try:
        plot_training_curves(train_log, path, title=Path(output_folder).name)
    except DataError as e:
        logger.warning("training curves not drawn: %s", e)


def logged_test_stats(metrics):
    """What the train log shows of a test stage: its loss, UAR and WER when metrics.json has them."""
    stats = {"loss": metrics["test_loss"]}
    if "test" in metrics:
        stats["UAR"] = metrics["test"]["uar"]
    if "wer" in metrics:
        stats["WER"] = metrics["wer"]
    return stats
