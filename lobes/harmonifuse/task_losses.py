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

    def combined(self):
        """Σ over tasks of the task's mean batch loss: each task counts once, whatever its batch count."""
        by_task = {}
        for tag, v in self.means().items():
            by_task.setdefault(tag.task, []).append(v)
        return sum(sum(v) / len(v) for v in by_task.values())
