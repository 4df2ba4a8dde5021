"""Which task a HarmoniFuse batch trains or scores, and on which data: the tag every batch carries.

``TaskSplit("asr")`` is the ASR training source, ``TaskSplit("ser", "emilia")`` an extra SER training source,
``TaskSplit("asr", "test-clean")`` / ``TaskSplit("ser", "valid")`` evaluation sets. ``str()`` gives the key
used in YAML (``interleave_ratio``), logs and metrics.json (``asr``, ``ser:emilia``, ``asr:test-clean``);
:meth:`TaskSplit.parse` reads it back.
"""
from dataclasses import dataclass

from lobes.errors import DataError

TASKS = ("asr", "ser")


@dataclass(frozen=True, order=True)
class TaskSplit:
    """A task (``asr`` / ``ser``) and the split or source its batches come from (``""``: the task's training set)."""

    task: str
    split: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"unknown task '{self.task}' in task tag '{self}'; tasks are {list(TASKS)}")

    def __str__(self):
        return f"{self.task}:{self.split}" if self.split else self.task

    @classmethod
    def parse(cls, tag):
        """``"asr"``, ``"ser:emilia"``, ``"asr:test-clean"`` (or a TaskSplit) -> TaskSplit."""
        if isinstance(tag, cls):
            return tag
        task, _, split = str(tag).partition(":")
        return cls(task, split)
