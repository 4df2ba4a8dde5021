"""Per-task batch losses of one HarmoniFuse stage, and the task-combined loss that selects the checkpoint.

Training keeps a running sum per :class:`lobes.harmonifuse.task_split.TaskSplit` on the device (read once at the
stage end: no host read per step). Evaluation keeps one row per batch (its first utterance id, tag, loss), which
DDP gathers back into single-process order, so the means are the same floats for any number of ranks.
"""
from lobes import distributed as D


class TaskLosses:
    def __init__(self):
        self.sums = {}                                   # training: TaskSplit -> [device sum, batches]
        self.rows = {"ids": [], "tag": [], "loss": []}   # evaluation: one row per batch

    def add_train(self, tag, loss):
        sums = self.sums.setdefault(tag, [0.0, 0])
        sums[0], sums[1] = sums[0] + loss.detach(), sums[1] + 1

    def add_eval(self, first_id, tag, loss):
        for key, value in (("ids", first_id), ("tag", tag), ("loss", float(loss))):
            self.rows[key].append(value)

    def gather(self, order):
        """All ranks' evaluation rows in single-process order (``order`` from the sharded loader)."""
        self.rows = D.gather_rows(self.rows, order)

    def means(self):
        """TaskSplit -> mean batch loss: training from the device sums, evaluation from the rows in order."""
        if self.sums:
            return {tag: float(s) / n for tag, (s, n) in self.sums.items() if n}
        sums = {}
        for tag, loss in zip(self.rows["tag"], self.rows["loss"]):
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
