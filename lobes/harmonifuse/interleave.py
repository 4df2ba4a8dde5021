"""Batch-interleaved multi-task training (HarmoniFuse): whole batches of one task, tasks alternating.

ASR and SER come from separate corpora with separate labels, so a batch never mixes tasks; the model learns
the task from its prompt tokens. Two ways to use it:

1. A real ``DataLoader`` (what ``Brain.fit`` accepts):
   ``make_interleaved_dataloader({"asr": asr_ds, "ser": ser_ds}, {"asr": asr_bs, "ser": ser_bs}, ratio)``.
   The datasets are concatenated (:class:`TaskTaggedConcat` adds ``"task"`` to every item), an
   :class:`InterleavedBatchSampler` yields index lists, and the default collate is SpeechBrain's
   ``PaddedBatch``, so a batch has ``batch.task == ["asr", "asr", ...]`` and only that task's keys.
   In a Brain, set ``brain.train_sampler = loader.batch_sampler`` so ``fit`` calls ``set_epoch`` each epoch.
2. :class:`InterleavedLoader` over ready-made DataLoaders, yielding ``(task, batch)`` pairs.

:func:`batch_task` returns the task of either kind of batch (and rejects a mixed one).
For evaluation, :func:`make_sequential_dataloader` runs every batch of every task exactly once, task after
task (no cycling of the smaller set, no ratio), over the same task-tagged concatenation.

Schedule (:func:`interleave_schedule`). With ratio r_τ (e.g. asr:ser = 2:1) and n_τ batches per pass of
task τ, an epoch is R rounds, each holding exactly r_τ batches of τ, so counts are R·r_τ (exact ratio):
* ``length="max"`` (default): R = max_τ ceil(n_τ / r_τ): every batch of every task is seen at least once;
  tasks that run out first start a new pass over their sampler (the smaller corpus is cycled);
* ``length="min"``: R = min_τ floor(n_τ / r_τ): stop before any task needs a second pass;
* ``length=N`` (int): N batches in all; N must be a multiple of Σ r_τ.
``order="round_robin"``: each round lists the tasks in the given order (2:1 -> A A S A A S ...);
``order="shuffle"``: the R·Σr task slots are permuted with a generator seeded by (seed, epoch).

Determinism and DDP: the schedule depends only on (seed, epoch, ratio, n_τ). The k-th pass over task τ's
sampler in epoch e calls its ``set_epoch(e · P_τ + k)`` (P_τ = passes per epoch from the lengths at
construction), so every pass is reproducible and differs from the others. Under DDP pass ``rank`` and
``world`` to :func:`make_interleaved_dataloader` with the *single-process* per-task batch samplers (same seed
on every rank): their batches are the *global* batches (``<task>_batch_size`` is per optimizer step, as
``batch_size`` in the other recipes), each wrapped in :class:`BatchShares`, which gives rank r the r-th
contiguous share of every global batch (:func:`split_batch`). The n_τ, the schedule and an int ``length`` (in
steps) are those of one process, so at every step all ranks run the same task and together the utterances of
the single-process batch of that step. A global batch with fewer utterances than ranks leaves some ranks an
empty share: they run the batch's first utterance as zero-weight padding (:class:`PaddingIndex`, the item's
``ddp_padding`` key), because DDP needs every rank's backward. The training loss of each share is weighted so
that DDP's gradient average is the single-process batch mean (``lobes.distributed.share_weight``).
"""
import bisect
import math
import random

import torch
from torch.utils.data import DataLoader, Dataset

from lobes.errors import DataError

LENGTH_MODES = ("max", "min")


def parse_ratio(ratio, tasks):
    """{"asr": 2, "ser": 1}, (2, 1) or "2:1" (in ``tasks`` order) -> dict of positive ints."""
    tasks = list(tasks)
    if isinstance(ratio, str):
        ratio = [p.strip() for p in ratio.split(":")]
    if isinstance(ratio, dict):
        unknown = set(ratio) - set(tasks)
        if unknown:
            raise DataError(f"ratio names unknown task(s) {sorted(unknown)}; tasks are {tasks}")
        out = {t: ratio.get(t, 0) for t in tasks}
    else:
        ratio = list(ratio)
        if len(ratio) != len(tasks):
            raise DataError(f"ratio {ratio} has {len(ratio)} parts for {len(tasks)} tasks {tasks}")
        out = dict(zip(tasks, ratio))
    try:
        out = {t: int(v) for t, v in out.items()}
    except (TypeError, ValueError):
        raise DataError(f"ratio parts must be integers, got {out}") from None
    if any(v < 0 for v in out.values()) or sum(out.values()) == 0:
        raise DataError(f"ratio parts must be >= 0 and not all 0, got {out}")
    return out


def num_rounds(counts, ratio, length="max"):
    """R, the number of rounds in an epoch (see module doc)."""
    active = [t for t in ratio if ratio[t] > 0]
    for t in active:
        if counts[t] <= 0:
            raise DataError(f"task '{t}' has no batches but its ratio is {ratio[t]}")
    per_round = sum(ratio.values())
    if length == "max":
        return max(math.ceil(counts[t] / ratio[t]) for t in active)
    if length == "min":
        return min(counts[t] // ratio[t] for t in active)
    if isinstance(length, int) and not isinstance(length, bool) and length > 0:
        if length % per_round:
            raise DataError(f"length={length} batches is not a multiple of the ratio total {per_round} "
                            f"({ratio}); the ratio could not hold exactly")
        return length // per_round
    raise DataError(f"length must be 'max', 'min' or a positive int, got {length!r}")


def interleave_schedule(counts, ratio, length="max", order="round_robin", seed=0, epoch=0):
    """The list of task names, one per batch, for one epoch."""
    rounds = num_rounds(counts, ratio, length)
    one_round = [t for t in ratio for _ in range(ratio[t])]
    schedule = one_round * rounds
    if order == "shuffle":
        random.Random(f"interleave:{seed}:{epoch}").shuffle(schedule)
    elif order != "round_robin":
        raise DataError(f"order must be 'round_robin' or 'shuffle', got '{order}'")
    return schedule


def _epoch_setter(obj):
    """The first of obj, obj.batch_sampler, obj.sampler, obj.batch_sampler.sampler that has set_epoch."""
    for cand in (obj, getattr(obj, "batch_sampler", None), getattr(obj, "sampler", None),
                 getattr(getattr(obj, "batch_sampler", None), "sampler", None)):
        if cand is not None and hasattr(cand, "set_epoch"):
            return cand
    return None


class _Interleaver:
    """Shared logic: ``sources`` maps task -> something with len() and iter() (a batch sampler or loader)."""

    def __init__(self, sources, ratio=None, length="max", order="round_robin", seed=0):
        if not sources:
            raise DataError("interleaving needs at least one task")
        self.sources = dict(sources)
        self.tasks = list(self.sources)
        self.ratio = parse_ratio(ratio if ratio is not None else [1] * len(self.tasks), self.tasks)
        self.length = length
        self.order = order
        self.seed = seed
        self.epoch = 0
        counts = self._counts()
        rounds = num_rounds(counts, self.ratio, length)
        # P_τ: passes over task τ's sampler per epoch, fixed at construction so pass k of epoch e maps to a
        # fixed sampler epoch e·P_τ + k whatever happened in earlier epochs (resumable).
        self.passes = {t: max(1, math.ceil(rounds * self.ratio[t] / counts[t])) if self.ratio[t] else 1
                       for t in self.tasks}

    def _counts(self):
        counts = {}
        for t, s in self.sources.items():
            try:
                counts[t] = len(s)
            except TypeError:
                raise DataError(f"the sampler/loader of task '{t}' has no len(); interleaving needs it") from None
        return counts

    def _set_pass(self, task, k):
        setter = _epoch_setter(self.sources[task])
        if setter is not None:
            setter.set_epoch(self.epoch * self.passes[task] + k)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        for t in self.tasks:
            self._set_pass(t, 0)

    def schedule(self):
        return interleave_schedule(self._counts(), self.ratio, self.length, self.order, self.seed, self.epoch)

    def __len__(self):
        return num_rounds(self._counts(), self.ratio, self.length) * sum(self.ratio.values())

    def _iter_tasks(self):
        """Yield (task, item from that task's source) following the schedule."""
        schedule = self.schedule()
        iters, pass_no = {}, {t: 0 for t in self.tasks}
        for task in schedule:
            if task not in iters:
                iters[task] = iter(self.sources[task])
            try:
                item = next(iters[task])
            except StopIteration:
                pass_no[task] += 1
                self._set_pass(task, pass_no[task])
                iters[task] = iter(self.sources[task])
                try:
                    item = next(iters[task])
                except StopIteration:
                    raise DataError(f"the sampler/loader of task '{task}' yielded no batches") from None
            yield task, item
        # Leave every sampler at its first pass of this epoch, as set_epoch did.
        for t in self.tasks:
            if pass_no[t]:
                self._set_pass(t, 0)


def split_batch(batch, world):
    """A global batch -> ``world`` contiguous shares in order, sizes differing by at most one (the first
    ``len(batch) % world`` shares one longer); shares are empty when the batch has fewer items than ranks."""
    q, extra = divmod(len(batch), world)
    bounds = [r * q + min(r, extra) for r in range(world + 1)]
    return [list(batch[bounds[r]:bounds[r + 1]]) for r in range(world)]


PADDING_KEY = "ddp_padding"


class PaddingIndex(int):
    """The dataset index of a zero-weight DDP padding item (a rank whose share of a global batch is empty runs
    that batch's first utterance; :class:`TaskTaggedConcat` marks the item with ``ddp_padding: True``)."""


def is_padding(batch):
    """Whether a collated training batch is a rank's zero-weight padding (:class:`BatchShares`)."""
    return bool(getattr(batch, PADDING_KEY, False))


class BatchShares(torch.utils.data.Sampler):
    """DDP rank ``rank``'s share of every global batch of ``batch_sampler`` (see module doc): the r-th of
    :func:`split_batch`'s contiguous shares, so the ranks' shares of one step are the single-process batch of
    that step, each utterance once; an empty share is the batch's first index as a :class:`PaddingIndex`.
    ``set_epoch`` reaches the wrapped sampler: every rank must build the same global batches (same seed)."""

    def __init__(self, batch_sampler, rank, world):
        if not (0 <= int(rank) < int(world)):
            raise DataError(f"rank {rank} is not in 0..{int(world) - 1}")
        self.batch_sampler, self.rank, self.world = batch_sampler, int(rank), int(world)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            batch = list(batch)
            if not batch:
                raise DataError("a training batch sampler yielded an empty batch")
            yield split_batch(batch, self.world)[self.rank] or [PaddingIndex(batch[0])]

    def set_epoch(self, epoch):
        setter = _epoch_setter(self.batch_sampler)
        if setter is not None:
            setter.set_epoch(epoch)


class InterleavedBatchSampler(_Interleaver, torch.utils.data.Sampler):
    """Batch sampler over a :class:`TaskTaggedConcat`: index lists, one task per batch.

    ``batch_samplers``: dict task -> batch sampler over that task's own dataset (yields lists of local
    indices); ``offsets``: dict task -> index of that dataset's first item in the concatenation
    (``TaskTaggedConcat.offsets``).
    """

    def __init__(self, batch_samplers, offsets, ratio=None, length="max", order="round_robin", seed=0):
        _Interleaver.__init__(self, batch_samplers, ratio, length, order, seed)
        missing = set(self.tasks) - set(offsets)
        if missing:
            raise DataError(f"no dataset offset for task(s) {sorted(missing)}")
        self.offsets = dict(offsets)
        self.last_schedule = None

    def __iter__(self):
        tasks = []
        for task, batch in self._iter_tasks():
            tasks.append(task)
            off = self.offsets[task]
            yield [PaddingIndex(off + i) if isinstance(i, PaddingIndex) else off + int(i) for i in batch]
        self.last_schedule = tasks


class TaskTaggedConcat(Dataset):
    """Concatenation of per-task map-style datasets; every item (a dict) gets ``"task": name`` added."""

    def __init__(self, datasets):
        self.tasks = list(datasets)
        self.datasets = [datasets[t] for t in self.tasks]
        self.offsets, total = {}, 0
        self._starts = []
        for t, ds in zip(self.tasks, self.datasets):
            self.offsets[t] = total
            self._starts.append(total)
            total += len(ds)
        self._total = total

    def __len__(self):
        return self._total

    @property
    def data_ids(self):
        """Utterance ids in concatenation order (what sharded evaluation orders gathered outputs by)."""
        ids = []
        for t, ds in zip(self.tasks, self.datasets):
            if not hasattr(ds, "data_ids"):
                raise DataError(f"dataset of task '{t}' has no data_ids (a DynamicItemDataset has)")
            ids += list(ds.data_ids)
        return ids

    def __getitem__(self, i):
        if not 0 <= i < self._total:
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        item = self.datasets[k][i - self._starts[k]]
        if not isinstance(item, dict):
            raise DataError(f"dataset of task '{self.tasks[k]}' returned a {type(item).__name__}, "
                            "expected a dict (a DynamicItemDataset with output keys)")
        if "task" in item:
            raise DataError(f"dataset of task '{self.tasks[k]}' already has an output key 'task'")
        if isinstance(i, PaddingIndex):
            return {**item, "task": self.tasks[k], PADDING_KEY: True}
        return {**item, "task": self.tasks[k]}


def make_interleaved_dataloader(datasets, batch_samplers, ratio=None, length="max", order="round_robin",
                                seed=0, collate_fn=None, rank=0, world=1, **loader_kwargs):
    """DataLoader over the task-tagged concatenation with an :class:`InterleavedBatchSampler`.

    ``collate_fn`` defaults to SpeechBrain's ``PaddedBatch``; ``loader_kwargs`` go to ``DataLoader``
    (num_workers, pin_memory, ...). The sampler is ``loader.batch_sampler``. DDP: ``rank`` / ``world`` give
    each rank its contiguous share of every global batch of ``batch_samplers`` (:class:`BatchShares`, module doc).
    """
    if set(datasets) != set(batch_samplers):
        raise DataError(f"datasets {sorted(datasets)} and batch_samplers {sorted(batch_samplers)} name "
                        "different tasks")
    if collate_fn is None:
        from speechbrain.dataio.batch import PaddedBatch
        collate_fn = PaddedBatch
    concat = TaskTaggedConcat(datasets)
    samplers = {t: batch_samplers[t] for t in concat.tasks}
    if world > 1:
        samplers = {t: BatchShares(s, rank, world) for t, s in samplers.items()}
    sampler = InterleavedBatchSampler(samplers, concat.offsets, ratio, length, order, seed)
    return DataLoader(concat, batch_sampler=sampler, collate_fn=collate_fn, **loader_kwargs)


class SequentialTaskBatchSampler(torch.utils.data.Sampler):
    """Evaluation batch sampler over a :class:`TaskTaggedConcat`: all batches of the first task, then the next.

    Each task's batch sampler is run once, so every utterance is scored exactly once (interleaving would
    cycle the smaller set). Batches never mix tasks.
    """

    def __init__(self, batch_samplers, offsets):
        if not batch_samplers:
            raise DataError("sequential evaluation needs at least one task")
        missing = set(batch_samplers) - set(offsets)
        if missing:
            raise DataError(f"no dataset offset for task(s) {sorted(missing)}")
        self.samplers, self.offsets = dict(batch_samplers), dict(offsets)

    def __iter__(self):
        for task, sampler in self.samplers.items():
            off = self.offsets[task]
            for batch in sampler:
                yield [off + int(i) for i in batch]

    def __len__(self):
        return sum(len(s) for s in self.samplers.values())


def make_sequential_dataloader(datasets, batch_samplers, collate_fn=None, **loader_kwargs):
    """DataLoader for evaluation: :class:`SequentialTaskBatchSampler` over the task-tagged concatenation."""
    if set(datasets) != set(batch_samplers):
        raise DataError(f"datasets {sorted(datasets)} and batch_samplers {sorted(batch_samplers)} name "
                        "different tasks")
    if collate_fn is None:
        from speechbrain.dataio.batch import PaddedBatch
        collate_fn = PaddedBatch
    concat = TaskTaggedConcat(datasets)
    sampler = SequentialTaskBatchSampler({t: batch_samplers[t] for t in concat.tasks}, concat.offsets)
    return DataLoader(concat, batch_sampler=sampler, collate_fn=collate_fn, **loader_kwargs)


class InterleavedLoader(_Interleaver):
    """Iterate several DataLoaders batch by batch following the schedule; yields ``(task, batch)``."""

    def __init__(self, loaders, ratio=None, length="max", order="round_robin", seed=0):
        super().__init__(loaders, ratio, length, order, seed)

    def __iter__(self):
        return self._iter_tasks()


def batch_task(batch):
    """The single task of a batch: a ``(task, batch)`` pair or a batch with a ``task`` list/attribute."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], str):
        return batch[0]
    tasks = batch["task"] if isinstance(batch, dict) else getattr(batch, "task", None)
    if tasks is None:
        raise DataError("batch carries no task (expected a (task, batch) pair or a 'task' key)")
    if isinstance(tasks, str):
        return tasks
    uniq = set(tasks)
    if len(uniq) != 1:
        raise DataError(f"batch mixes tasks {sorted(uniq)}; interleaved batches must hold one task")
    return uniq.pop()
