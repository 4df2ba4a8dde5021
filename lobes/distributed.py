"""Multi-GPU semantics: a global batch whatever the GPU count, and evaluation sharded across DDP ranks.

Global batch. A recipe's ``batch_size`` is the *global* effective batch: the utterances behind one optimizer
step, summed over gradient-accumulation micro-batches and DDP ranks (SpeechBrain's own ``batch_size`` is per
process, so ``torchrun --nproc_per_node=2`` would silently double it). ``micro_batch_size`` is what one GPU
runs per forward/backward (its memory decides it); the recipe YAML derives

    grad_accumulation_factor = batch_size / (micro_batch_size x world size)

with :func:`grad_accumulation_factor`, which SpeechBrain's ``Brain`` reads from the hparams. A split that does
not divide is an error naming the keys. ``micro_batch_size: null`` means ``batch_size / world size`` (no
accumulation), so one process behaves as SpeechBrain always did; ``auto`` (the recipes' default) is
resolved at start by ``lobes.memory_plan.resolve_micro_batch`` on a GPU and means ``null`` elsewhere.

Dynamic batching uses the same rule in seconds of audio: ``max_batch_length`` is the global seconds per
optimizer step, ``micro_batch_length`` the per-GPU cap of one ``DynamicBatchSampler`` batch (null:
``max_batch_length / world size``), and ``grad_accumulation_factor = max_batch_length / (micro_batch_length x
world size)``. A dynamic batch holds at most its cap (bucket packing leaves it a little under), so the global
audio per step is at most ``max_batch_length`` seconds, the same bound for any GPU count.

Sharded evaluation. SpeechBrain 1.1 runs the whole validation/test set on every rank. :func:`shard_batches`
cuts the evaluation loader's batch list (fixed or dynamic, built exactly as one process would) so that rank r
runs batches r, r+W, ... — each batch is the one a single process would run, no utterance is duplicated or
padded — and :func:`gather_rows` brings the per-utterance outputs of every rank back into the single-process
order on all ranks, so metrics (bootstrap CIs included) are computed on the same lists as with one process. Both
check the ids: the batches must cover the evaluated set once, and the gathered outputs must be that set, in
order, with nothing dropped or duplicated (a DataError naming the ids otherwise). :class:`EvalShards` holds a
Brain's state of it.
"""
import atexit
import logging
import math
import os
import sys

import torch

from lobes.errors import DataError

logger = logging.getLogger(__name__)


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def finish_together_at_exit():
    """Register a hook that, when the process exits, waits for every rank and releases the process group
    (``release_process_group``); registering again replaces it, so it runs once however many Brains a process
    builds.

    Without it a rank with nothing left to do (the others still write metrics, plots and exports on the main
    process) can abort while its gloo group is torn down ("terminate called without an active exception"), after
    which torchrun kills the main process before it has written its files.
    """
    atexit.unregister(_finish_together)
    atexit.register(_finish_together)


def _finish_together():
    if is_distributed():
        # after an uncaught exception (sys.last_value) the other ranks may be inside another collective: leave
        # without the barrier, so that torchrun sees this rank fail at once instead of a hang
        if getattr(sys, "last_value", None) is None:
            torch.distributed.barrier()
        release_process_group()


def release_process_group():
    """Destroy the default process group and free what still holds it while the interpreter is fully alive.

    ``destroy_process_group`` only unregisters the group: a DDP reducer or a finished gloo work object kept alive by
    a reference cycle (a Brain) still holds it, and freeing those during interpreter finalization can abort the
    process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291). A collection now
    frees them while Python still runs.
    """
    import gc

    if is_distributed():
        torch.distributed.destroy_process_group()
    gc.collect()


def world_size():
    """DDP world size: the initialised process group's, else torchrun's ``WORLD_SIZE`` (hparams are loaded
    before ``ddp_init_group`` in some scripts), else 1."""
    if is_distributed():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return torch.distributed.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def _split(total, micro, world, total_key, micro_key, integral):
    """(micro per GPU, accumulation factor) for ``total`` units per optimizer step over ``world`` GPUs."""
    if world < 1:
        raise DataError(f"world size {world} must be >= 1")
    if not (isinstance(total, (int, float)) and total > 0) or (integral and int(total) != total):
        raise DataError(f"{total_key}: {total!r} must be a positive {'integer' if integral else 'number'}")
    if micro is None or micro == "auto":  # auto: lobes.memory_plan decides on a GPU; until then (and on CPU) null
        micro = total / world
        if integral:
            if total % world:
                raise DataError(f"{total_key} {total} (global) does not divide over {world} GPUs: choose a multiple "
                                f"of {world} or set {micro_key}")
            micro = total // world
        return micro, 1
    if not (isinstance(micro, (int, float)) and micro > 0) or (integral and int(micro) != micro):
        raise DataError(f"{micro_key}: {micro!r} must be a positive {'integer' if integral else 'number'} or null")
    accum = total / (micro * world)
    if accum < 1 - 1e-9 or abs(accum - round(accum)) > 1e-9:
        per_gpu = total / world
        raise DataError(
            f"{total_key} {total} (global) is not {micro_key} {micro} x {world} GPU(s) x an integer "
            f"(gradient accumulation): set {micro_key} to a divisor of {total_key} / GPUs = {per_gpu:g}")
    return micro, round(accum)


def batch_split(batch_size, micro_batch_size=None, dynamic_batching=False, max_batch_length=None,
                micro_batch_length=None, world=None):
    """``(micro, grad_accumulation_factor)``: utterances (or, with dynamic batching, seconds) per GPU per
    forward/backward, and micro-batches per optimizer step, for the global batch over ``world`` GPUs."""
    world = world_size() if world is None else world
    if dynamic_batching:
        return _split(max_batch_length, micro_batch_length, world, "max_batch_length", "micro_batch_length",
                      integral=False)
    return _split(batch_size, micro_batch_size, world, "batch_size", "micro_batch_size", integral=True)


def grad_accumulation_factor(batch_size, micro_batch_size=None, dynamic_batching=False, max_batch_length=None,
                             micro_batch_length=None):
    """The recipe YAML's ``grad_accumulation_factor`` (read by SpeechBrain's ``Brain``), derived at load time.

    Arguments
    ---------
    batch_size : int
        Global batch in utterances (over all GPUs and accumulation steps).
    micro_batch_size : int or None
        Utterances per GPU per forward/backward; None means the whole per-GPU batch at once.
    dynamic_batching : bool
        Batch by seconds of audio (``max_batch_length`` / ``micro_batch_length``) instead of utterances.
    max_batch_length : float or None
        Global batch in seconds of audio, with ``dynamic_batching``.
    micro_batch_length : float or None
        Seconds of audio per GPU per forward/backward, with ``dynamic_batching``.
    """
    return batch_split(batch_size, micro_batch_size, dynamic_batching, max_batch_length, micro_batch_length)[1]


def micro_batch(hparams, world=None):
    """Per-GPU micro-batch of a recipe's hparams: utterances, or seconds with ``dynamic_batching``."""
    return batch_split(hparams["batch_size"], hparams["micro_batch_size"], hparams["dynamic_batching"],
                       hparams["max_batch_length"], hparams["micro_batch_length"], world)[0]


def describe_batch(hparams, accum, world=None):
    """'global batch 32 = micro 8 x accum 2 x 2 GPUs' (seconds of audio with dynamic batching)."""
    world = world_size() if world is None else world
    micro = micro_batch(hparams, world)
    gpus = f"{world} GPU{'s' if world > 1 else ''}"
    if hparams["dynamic_batching"]:
        return (f"global batch {hparams['max_batch_length']:g} s = micro {micro:g} s x accum {accum} x {gpus} "
                "(dynamic batching: at most, in seconds of audio)")
    return f"global batch {hparams['batch_size']} = micro {micro} x accum {accum} x {gpus}"


def check_batch(hparams, accum, world=None):
    """Error when the accumulation factor in use (e.g. overridden with ``--grad_accumulation_factor``) does not
    give the recipe's global batch; returns the description to log."""
    world = world_size() if world is None else world
    expected = batch_split(hparams["batch_size"], hparams["micro_batch_size"], hparams["dynamic_batching"],
                           hparams["max_batch_length"], hparams["micro_batch_length"], world)[1]
    if accum != expected:
        raise DataError(
            f"grad_accumulation_factor {accum} does not give the global batch over {world} GPU(s) (expected "
            f"{expected}): set batch_size / micro_batch_size (or max_batch_length / micro_batch_length) instead "
            "of grad_accumulation_factor, which the recipe YAML derives from them")
    return describe_batch(hparams, accum, world)


# ----------------------------------------------------------------------------------------- sharded evaluation
class ListBatchSampler(torch.utils.data.Sampler):
    """A fixed list of batches (lists of dataset indices), iterated in order every epoch."""

    def __init__(self, batches):
        self.batches = [list(b) for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def eval_batches(dataset, loader_kwargs):
    """The batches one process would evaluate: the ``batch_sampler``'s, or consecutive ``batch_size`` chunks."""
    sampler = loader_kwargs.get("batch_sampler")
    if sampler is not None:
        return [list(b) for b in sampler]
    if loader_kwargs.get("shuffle") or loader_kwargs.get("sampler") is not None:
        raise ValueError("evaluation loaders are not shuffled or sampled (sharding needs one fixed order)")
    size = loader_kwargs.get("batch_size", 1)
    return [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]


def shard_batches(dataset, loader_kwargs, rank_=None, world=None):
    """Loader kwargs evaluating this rank's share of ``dataset`` (batches r, r+W, ...), and the utterance ids
    in single-process order (what :func:`gather_rows` sorts by and checks against)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    batches = eval_batches(dataset, loader_kwargs)
    ids = list(dataset.data_ids) if hasattr(dataset, "data_ids") else list(range(len(dataset)))
    order = [ids[i] for b in batches for i in b]
    check_ids(order, ids, "evaluation batches")  # a sampler that drops or repeats an utterance fails here
    kwargs = {k: v for k, v in loader_kwargs.items() if k not in ("batch_size", "shuffle", "batch_sampler",
                                                                  "sampler", "drop_last")}
    kwargs["batch_sampler"] = ListBatchSampler(batches[rank_::world])
    return kwargs, order


def check_ids(got, expected, what):
    """DataError unless ``got`` holds every id of ``expected`` exactly once (no drop, no duplicate, no stranger)."""
    if len(got) == len(expected) and set(got) == set(expected) and len(set(got)) == len(got):
        return
    seen, dup = set(), []
    for u in got:
        if u in seen:
            dup.append(u)
        seen.add(u)
    want = set(expected)
    missing = [u for u in expected if u not in seen]
    strangers = [u for u in seen if u not in want]
    problems = [f"{name} {len(v)}: {v[:5]}" for name, v in (("missing", missing), ("duplicated", dup),
                                                            ("not in the evaluated set", strangers)) if v]
    raise DataError(f"{what} do not cover the {len(expected)} evaluated utterances once each: " + "; ".join(problems))


def all_gather(obj):
    """Every rank's ``obj`` (a list, rank order); ``[obj]`` without DDP."""
    if not is_distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_rows(columns, order, what="outputs"):
    """Merge per-rank output columns (a dict of equal-length lists, keyed by ``ids``) from every rank into
    single-process ``order`` on all ranks. A column empty on every rank stays empty. The gathered ids must be
    ``order``'s ids, each once: every evaluated utterance, nothing dropped, duplicated or foreign (a DataError
    naming the ids otherwise; ``what``: whose outputs). Nothing collected on any rank (a collector this stage did
    not use) is returned as it is."""
    parts = all_gather(columns)
    if not any(p["ids"] for p in parts):
        return columns
    check_ids([u for p in parts for u in p["ids"]], order, f"gathered {what}")
    if len(parts) == 1:
        return columns  # one process: already in loader order, which is ``order``
    keys = list(columns)
    full = [k for k in keys if any(len(p[k]) for p in parts)]
    position = {u: i for i, u in enumerate(order)}
    rows = {u: tuple(p[k][j] for k in full) for p in parts for j, u in enumerate(p["ids"])}
    merged = {k: [] for k in keys}
    for _, values in sorted(rows.items(), key=lambda kv: position[kv[0]]):
        for k, v in zip(full, values):
            merged[k].append(v)
    return merged


def weighted_mean(total, count):
    """Sample-weighted mean over all ranks of a per-rank ``(sum of loss x batch size, utterance count)``."""
    t = torch.tensor([float(total), float(count)], dtype=torch.float64)
    if is_distributed():
        if torch.distributed.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(t)
        t = t.cpu()
    return (t[0] / t[1]).item() if t[1] > 0 else math.nan


class EvalShards:
    """A Brain's sharded evaluation: the single-process id order of each stage's loader (``loader_kwargs``) and
    the stage loss as the sample-weighted mean over every rank's utterances (``add`` per batch, ``mean``)."""

    def __init__(self):
        self.order = {}  # stage -> utterance ids in single-process order
        self.start()

    def start(self):
        self.loss_sum, self.count = 0.0, 0

    def loader_kwargs(self, stage, dataset, loader_kwargs):
        kwargs, self.order[stage] = shard_batches(dataset, loader_kwargs)
        return kwargs

    def add(self, loss, n):
        self.loss_sum += float(loss) * n  # a sample-weighted mean is the same for any sharding
        self.count += n

    def mean(self):
        return weighted_mean(self.loss_sum, self.count)


# ------------------------------------------------------------------------ training shares of one global batch
def sum_over_ranks(values):
    """The element-wise sum over all ranks of a tensor, in float64 (``values`` itself without DDP), on the device
    the reduction ran on: CUDA under NCCL (which reduces CUDA tensors only), so nothing waits on a host copy."""
    if not is_distributed():
        return values
    t = values.detach().to(torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    torch.distributed.all_reduce(t)
    return t


def share_weight(count):
    """W · n_r / Σ_r n_r: the loss weight of this rank's share of a global batch when the loss is a mean over
    ``count`` = n_r units (utterances, or target tokens for a token-averaged loss; 0 for a padding share).

    DDP averages the ranks' gradients, so shares weighted so give (1/W) Σ_r (W n_r / N) (S_r / n_r) =
    Σ_r S_r / N, the gradient of the single-process mean over the same N units, whatever the split (equal shares
    of utterances still hold unequal token counts). One all-reduce of the counts per step; a float64 tensor
    (1 without DDP), on the reduction's device."""
    if not is_distributed():
        return torch.tensor(1.0, dtype=torch.float64)
    total = sum_over_ranks(torch.tensor([float(count)], dtype=torch.float64))
    return world_size() * float(count) / total[0]
