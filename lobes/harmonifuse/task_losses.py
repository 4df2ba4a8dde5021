"""Per-task batch losses of one HarmoniFuse stage, and the task-combined loss that selects the checkpoint.

Training keeps a running sum per :class:`lobes.harmonifuse.task_split.TaskSplit` on the device (read once at the
stage end: no host read per step). Evaluation is a :class:`lobes.collectors.Collector` with one row per utterance
(its tag, its batch's loss, whether it opens the batch), gathered like every collector: DDP brings the rows back
into single-process order, checked to be the evaluated set, so the means are the same floats for any number of
ranks. The gathered tags also give each split's utterances in that order (:meth:`split_orders`).

DDP training: every rank runs its share of each global batch (``lobes.harmonifuse.interleave.BatchShares``);
:func:`share_count` is the count the share's loss is a mean over, :func:`weighted_share_loss` weights the loss
so that DDP's gradient average is the single-process batch loss's, and :meth:`TaskLosses.reduce_train` turns the
ranks' sums of weighted losses into the single-process per-source sums.
"""
import torch

from lobes import distributed as D
from lobes.collectors import Collector
from lobes.harmonifuse import targets as T
from lobes.harmonifuse.targets import target_token_ids


class TaskLosses(Collector):
    columns = ("ids", "tag", "loss", "first")

    def __init__(self):
        super().__init__("evaluation batch losses")
        self.sums = {}                                   # training: TaskSplit -> [device sum, batches]

    def add_train(self, tag, loss):
        sums = self.sums.setdefault(tag, [0.0, 0])
        sums[0], sums[1] = sums[0] + loss.detach(), sums[1] + 1

    def reduce_train(self):
        """DDP, at the training stage end: each step's loss is the mean over ranks of their weighted share
        losses (:func:`weighted_share_loss`), so each source's sum becomes Σ over ranks / W (every rank runs the
        same sources and step count); the logged means then equal one process's."""
        if not D.is_distributed() or not self.sums:
            return
        tags = sorted(self.sums)
        sums = D.sum_over_ranks(torch.stack([torch.as_tensor(self.sums[t][0]).double() for t in tags]))
        for tag, total in zip(tags, sums / D.world_size()):
            self.sums[tag][0] = total

    def add_eval(self, ids, tag, loss):
        """One evaluation batch: its utterance ids, TaskSplit and loss (a batch counts once in the means)."""
        n = len(ids)
        self.add(ids=ids, tag=[tag] * n, loss=[float(loss)] * n, first=[True] + [False] * (n - 1))

    def split_orders(self):
        """TaskSplit -> its utterance ids in the rows' order (after ``gather``: single-process order)."""
        out = {}
        for u, tag in zip(self["ids"], self["tag"]):
            out.setdefault(tag, []).append(u)
        return out

    def means(self):
        """TaskSplit -> mean batch loss: training from the device sums, evaluation from the rows in order."""
        if self.sums:
            return {tag: float(s) / n for tag, (s, n) in self.sums.items() if n}
        sums = {}
        for tag, loss, first in zip(self["tag"], self["loss"], self["first"]):
            if not first:
                continue
            s = sums.setdefault(tag, [0.0, 0])
            s[0], s[1] = s[0] + loss, s[1] + 1
        return {tag: s / n for tag, (s, n) in sums.items()}

    def by_task(self):
        """task -> the mean over its sets of each set's mean batch loss."""
        by_task = {}
        for tag, v in self.means().items():
            by_task.setdefault(tag.task, []).append(v)
        return {task: sum(v) / len(v) for task, v in by_task.items()}

    def log_stats(self):
        """Log keys: training one per source (``loss_asr``, ``loss_ser``, ``loss_ser_emilia`` for the extra SER
        source ``ser:emilia``: no source overwrites another's), evaluation one per task (``loss_asr``, ``loss_ser``)."""
        if self.sums:
            return {"loss_" + str(tag).replace(":", "_"): round(v, 4) for tag, v in sorted(self.means().items())}
        return {f"loss_{task}": round(v, 4) for task, v in self.by_task().items()}

    def combined(self):
        """Σ over tasks of the task's mean batch loss: each task counts once, whatever its batch count."""
        return sum(self.by_task().values())


def share_count(speech_lm, task, targets, soft=None):
    """What the speech LM's loss of a batch is a mean over (``SpeechLM.forward``): the utterances for the
    classify head (hard or soft cross-entropy, batch mean); else the target tokens with their EOS (token mean);
    with soft labels (generative SER) Σ p · tokens over the (utterance, class) pairs, the soft loss's
    denominator. Host-side, with the model's own tokenisation and pairing (lobes.harmonifuse.targets)."""
    if speech_lm.ser_mode == "classify" and task == speech_lm.ser_task:
        return len(targets)
    if soft is None:
        return sum(len(y) for y in target_token_ids(speech_lm.tokenizer, targets))
    words, p = T.soft_target_pairs(soft, speech_lm.emotions)
    return float(T.token_weights(target_token_ids(speech_lm.tokenizer, words), p).sum())


def weighted_share_loss(loss, count):
    """This rank's training loss under DDP, weighted by ``lobes.distributed.share_weight`` for its share of
    ``count`` loss units (0 for a padding share: a zero gradient, yet the rank takes part in DDP's
    all-reduce); ``loss`` itself without DDP."""
    if not D.is_distributed():
        return loss
    return loss * D.share_weight(count).to(loss.device, loss.dtype)
