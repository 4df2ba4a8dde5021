"""Plan before running: the largest micro-batch that fits the GPU a recipe actually has (``micro_batch_size: auto``).

Each recipe's train.py calls :func:`resolve_micro_batch` once, before building its Brain. With
``micro_batch_size: auto`` on a CUDA device it predicts the peak memory of one GPU for micro-batches of the
recipe's longest training utterance, picks the largest divisor of ``batch_size / GPUs`` that fits the free
memory (``torch.cuda.mem_get_info``) with a margin, sets ``micro_batch_size`` and ``grad_accumulation_factor``
so the YAML's global batch holds, and logs one line, e.g.

    memory plan: micro-batch 4 x accum 8 x 1 GPU = global 32; predicted 14.8 GiB of 21.9 GiB free
    (margin 15% + 1.0 GiB)

If even micro-batch 1 does not fit it stops at once (:class:`MemoryPlanError`) naming the settings that would
fit (bf16, gradient checkpointing, ``delta_dtype``, a shorter maximum duration). On CPU (and meta) ``auto`` is
``null`` (no accumulation): CPU runs are unchanged.

HarmoniFuse (:func:`resolve_task_batches`) steps on one task's batch at a time and consecutive batches are of
different tasks, so accumulation would mix tasks in one step: it checks each ``<task>_batch_size`` instead and
stops naming the largest batch that fits (and the settings that would fit at the configured one).

How a peak is predicted: the recipe's own Brain runs two ``fit_batch`` steps (forward, loss, backward, AdamW
step) on a copy of its modules on PyTorch's ``meta`` device (shapes, no data: nothing is computed), under
:class:`lobes.memory_tracking.LiveMemory`; bf16 runs under CUDA's autocast op lists (``EmulatedAutocast``). The
peak = model storages + the steps' live peak + one largest tensor (kernels' scratch buffers no op returns) + one
more copy of the trainable gradients under DDP (its buckets). Validated against the measured CPU peak of the same
steps (benchmarks/bench_plan_memory.py, benchmarks/RESULTS.md §10).

Margin: ``free`` is read after the CUDA context exists (it is not counted twice); a plan keeps
``predicted x 1.15 + 1.0 GiB`` under it: 15% for the caching allocator's fragmentation (PyTorch's own guidance
for ``expandable_segments`` off), 1 GiB for cuBLAS / cuDNN workspaces and NCCL buffers.
"""
import copy
import logging
import weakref
from unittest import mock

import speechbrain as sb
import torch

from lobes.errors import DataError
from lobes.memory_tracking import (EmulatedAutocast, LiveMemory, checkpoint_recomputes_emulated,
                                   disabled_autocast_on_meta, meta_nonzero, meta_values, register_meta_ctc, storages)

logger = logging.getLogger(__name__)
GIB = 2 ** 30
MARGIN, OVERHEAD = 0.15, 1.0 * GIB


class MemoryPlanError(DataError):
    """Nothing fits: raised before any training step, naming what would fit."""


def fits(peak, free, margin=MARGIN, overhead=OVERHEAD):
    return peak * (1 + margin) + overhead <= free


# ------------------------------------------------------------------------------------------ meta copy
def _meta_copy_of(t, memo):
    """``t`` on meta with its storage sharing kept (views of one storage stay views of one meta storage)."""
    st = t.untyped_storage()
    if st._cdata not in memo:
        memo[st._cdata] = torch.empty(st.nbytes(), dtype=torch.uint8, device="meta")
    out = memo[st._cdata].view(t.dtype).as_strided(t.size(), t.stride(), t.storage_offset())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad) if t.is_leaf else out


def _holds_tensors(v):
    if isinstance(v, (torch.nn.Module, torch.Tensor)):
        return True
    if isinstance(v, dict):
        return any(_holds_tensors(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensors(x) for x in v)
    return False


def meta_hparams(hparams):
    """A copy of ``hparams`` whose modules (and anything else holding tensors) live on meta; other values are
    shared. One deepcopy memo, so ``hparams["wavlm"]`` and ``hparams["modules"]["wavlm"]`` stay one object."""
    storage_memo, memo = {}, {}

    def deepcopy_tensor(t, _memo):
        return _meta_copy_of(t, storage_memo)

    def deepcopy_weakref(r, memo):  # a back reference (a wrapped group's owner) follows its referent's copy
        return weakref.ref(memo[id(r())]) if r() is not None and id(r()) in memo else r
    with mock.patch.object(torch.Tensor, "__deepcopy__", deepcopy_tensor), \
            mock.patch.object(torch.nn.Parameter, "__deepcopy__", deepcopy_tensor), \
            mock.patch.dict(copy._deepcopy_dispatch, {weakref.ref: deepcopy_weakref}):
        out = {k: copy.deepcopy(v, memo) if _holds_tensors(v) else v for k, v in hparams.items()}
    for module in out["modules"].values():
        for m in module.modules():  # the worst case, and what meta can run: no LayerDrop, no SpecAugment
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "layerdrop"):
                cfg.layerdrop, cfg.apply_spec_augment = 0.0, False
    return out


def enable_checkpointing(modules):
    """Gradient checkpointing on every model that supports it (HF: ``gradient_checkpointing_enable``; a toolkit
    module with a ``gradient_checkpointing`` setting, e.g. MergedWavLM: True)."""
    for module in modules.values():
        for m in module.modules():
            if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", 0):
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif "gradient_checkpointing" in vars(m) and not type(m).__module__.startswith("transformers"):
                m.gradient_checkpointing = True


# ------------------------------------------------------------------------------------------ prediction
def longest_item(dataset):
    """The training utterance with the largest ``duration`` (what a padded batch's memory follows), loaded."""
    data = getattr(dataset, "data", None)
    if not data or not all("duration" in v for v in data.values()):
        raise DataError("micro_batch_size: auto needs the 'duration' of every training utterance (manifest); "
                        "set micro_batch_size to a number")
    ids = list(dataset.data_ids)
    longest = max(ids, key=lambda u: data[u]["duration"])
    return dataset[ids.index(longest)], float(data[longest]["duration"])


class BrainPredictor:
    """Predicted peak bytes of one GPU running the recipe's Brain on micro-batches of its longest utterance.

    ``item`` / ``seconds``: a ready batch element instead of ``train_set``'s longest (tools, benchmarks);
    ``autocast_policy``: whose autocast op lists bf16 follows ("cuda"; "cpu" to compare with a CPU run).
    ``precision`` / ``checkpointing`` evaluate alternatives for the refusal message; results are cached."""

    def __init__(self, hparams, brain_class, train_set=None, world=1, item=None, seconds=None,
                 autocast_policy="cuda"):
        self.hparams, self.brain_class, self.world, self.policy = hparams, brain_class, world, autocast_policy
        self.item, self.seconds = (item, float(seconds)) if item is not None else longest_item(train_set)
        self.cache = {}

    def __call__(self, micro, precision=None, checkpointing=False):
        key = (micro, precision or self.hparams["precision"], checkpointing)
        if key not in self.cache:
            self.cache[key] = self._run(*key)
        return self.cache[key]

    def _run(self, micro, precision, checkpointing):
        h = meta_hparams(self.hparams)
        if "batch_size" in h:  # a global batch (HarmoniFuse's per-task batches are the batch given here)
            h["batch_size"], h["micro_batch_size"] = micro, micro
        h["grad_accumulation_factor"] = 1  # one step each
        if checkpointing:
            enable_checkpointing(h["modules"])
        register_meta_ctc()
        with disabled_autocast_on_meta(), meta_values(), meta_nonzero(), checkpoint_recomputes_emulated(), \
                mock.patch("lobes.distributed.world_size", lambda: 1):
            brain = self.brain_class(modules=h["modules"], opt_class=h["opt_class"], hparams=h,
                                     run_opts={"device": "meta", "precision": "fp32", "eval_precision": "fp32"},
                                     checkpointer=None)
            if precision in ("bf16", "fp16"):  # torch's autocast refuses meta: CUDA's op lists, emulated
                brain.training_ctx = EmulatedAutocast(self.policy, torch.bfloat16 if precision == "bf16" else torch.float16)
            brain.check_loss_isfinite = lambda loss: None  # reads the loss on the host
            brain.init_optimizers()
            brain.modules.train()
            brain.on_stage_start(sb.Stage.TRAIN, 1)
            batch = sb.dataio.batch.PaddedBatch([self.item] * micro)
            live = LiveMemory()
            with live:
                for step in (1, 2):  # the second step runs with AdamW's states alive
                    brain.step = step
                    brain.fit_batch(batch)
        tensors = [t for m in h["modules"].values() for t in list(m.parameters()) + list(m.buffers())]
        model = sum(storages(tensors).values())
        trainable = sum(p.numel() * p.element_size() for m in h["modules"].values() for p in m.parameters()
                        if p.requires_grad)
        deltas = sum(p.numel() * p.element_size() for m in h["modules"].values() for n, p in m.named_parameters()
                     if ".deltas." in f".{n}" and p.dtype == torch.float32)
        return {"model": model, "dynamic_peak": live.peak, "kernel_temp": live.largest, "trainable": trainable,
                "fp32_deltas": deltas}


def peak_bytes(pred, accum, world):
    """Model + step peak + kernel scratch; + the trainable gradients kept across accumulation micro-batches
    (the step measured starts without them) and DDP's gradient buckets (one more copy) with several GPUs."""
    return (pred["model"] + pred["dynamic_peak"] + pred["kernel_temp"] + (pred["trainable"] if accum > 1 else 0)
            + (pred["trainable"] if world > 1 else 0))


# ------------------------------------------------------------------------------------------ the plan
def largest_fitting(predict, candidates, accum_of, world, free, margin=MARGIN, overhead=OVERHEAD):
    """The first of ``candidates`` (micro-batch sizes, largest first) whose predicted peak fits ``free`` bytes:
    ``(m, accumulation, peak bytes)``, or None. Peak is affine in m (predicted at 1 and 2, confirmed at m)."""
    p1 = predict(1)
    slope = predict(2)["dynamic_peak"] - p1["dynamic_peak"] if max(candidates) > 1 else 0
    for micro in candidates:
        accum = accum_of(micro)
        guess = dict(p1, dynamic_peak=p1["dynamic_peak"] + (micro - 1) * slope)
        if fits(peak_bytes(guess, accum, world), free, margin, overhead):
            exact = peak_bytes(predict(micro), accum, world)
            if fits(exact, free, margin, overhead):
                return micro, accum, exact
    return None


def plan_micro_batch(predict, batch_size, world, free, margin=MARGIN, overhead=OVERHEAD):
    """The largest divisor m of ``batch_size / world`` whose predicted peak fits ``free`` bytes:
    ``(m, accumulation, peak bytes)``, or None."""
    if batch_size % world:
        raise DataError(f"batch_size {batch_size} (global) does not divide over {world} GPUs")
    per_gpu = batch_size // world
    return largest_fitting(predict, [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0],
                           lambda m: per_gpu // m, world, free, margin, overhead)


def checkpointing_keys(hparams):
    """The YAML switches that :func:`enable_checkpointing` turns on (WavLM's, the LM's), where not yet on."""
    return [k for k in ("gradient_checkpointing", "lm_gradient_checkpointing") if k in hparams
            and hparams[k] is not True]


def alternatives(predictor, hparams, world, free, micro=1, accum=None):
    """[(setting, predicted peak bytes of ``micro`` (default: micro-batch 1, the most accumulation) or None,
    fits)] for the refusal message: bf16, gradient checkpointing, both, bf16 task vectors (``delta_dtype``),
    and the longest utterance that would fit."""
    accum = hparams["batch_size"] // world if accum is None else accum
    p1 = predictor(micro)
    base = peak_bytes(p1, accum, world)
    options = []
    if hparams["precision"] == "fp32":
        options.append(("precision: bf16", peak_bytes(predictor(micro, precision="bf16"), accum, world)))
    ckpt = " + ".join(f"{k}: True" for k in checkpointing_keys(hparams))
    if ckpt:
        options.append((ckpt, peak_bytes(predictor(micro, checkpointing=True), accum, world)))
        if hparams["precision"] == "fp32":
            options.append((f"precision: bf16 + {ckpt}",
                            peak_bytes(predictor(micro, precision="bf16", checkpointing=True), accum, world)))
    if "delta_dtype" in hparams and p1["fp32_deltas"]:
        options.append(("delta_dtype: !name:torch.bfloat16", base - p1["fp32_deltas"] // 2))
    # activations grow with the utterance: the longest duration that fits, scaled from the longest one
    room = (free - OVERHEAD) / (1 + MARGIN) - (base - p1["dynamic_peak"] - p1["kernel_temp"])
    seconds = predictor.seconds * room / (p1["dynamic_peak"] + p1["kernel_temp"])
    if seconds >= 1:
        options.append((f"utterances of at most about {seconds:.1f} s (now {predictor.seconds:.1f} s)", None))
    return [(name, peak, peak is None or fits(peak, free)) for name, peak in options], base


def refusal(options, base, seconds, where, what="micro-batch 1"):
    def fmt(name, peak):
        return f"{name} ({peak / GIB:.1f} GiB)" if peak is not None else name
    good = [fmt(n, p) for n, p, ok in options if ok]
    bad = [fmt(n, p) for n, p, ok in options if not ok]
    return (f"memory plan: {what} of {seconds:.1f} s needs {base / GIB:.1f} GiB predicted, more than fits {where}."
            f" Settings that would fit: {'; '.join(good) or 'none of those tried'}."
            + (f" Would not fit: {'; '.join(bad)}." if bad else "") + " Or use a GPU with more memory.")


def device_memory(device):
    """(free bytes, total bytes, name) of a CUDA device, as the driver reports them now."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return free, total, torch.cuda.get_device_properties(torch.device(device)).name


def _cuda_device(run_opts):
    device = str(run_opts.get("device") or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    return device if device.startswith("cuda") else None


def _where(free, total, name):
    return f"of {free / GIB:.1f} GiB free on {name} ({total / 1e9:.0f} GB; margin {MARGIN:.0%} + {OVERHEAD / GIB:.1f} GiB)"


def resolve_micro_batch(hparams, run_opts, brain_class, train_set, predictor=None):
    """``micro_batch_size: auto`` -> the plan (on CUDA) or ``null`` (elsewhere); sets ``micro_batch_size`` and
    ``grad_accumulation_factor`` in ``hparams`` before the Brain is built. Returns the plan's log line or None.
    ``predictor``: a :class:`BrainPredictor` of these hparams to reuse (its predictions are cached)."""
    from lobes import distributed as D

    if hparams["micro_batch_size"] != "auto":
        return None
    device = _cuda_device(run_opts)
    if device is None or hparams["dynamic_batching"]:
        hparams["micro_batch_size"] = None  # today's null: batch_size / GPUs, no accumulation
        hparams["grad_accumulation_factor"] = D.batch_split(
            hparams["batch_size"], None, hparams["dynamic_batching"], hparams["max_batch_length"],
            hparams["micro_batch_length"])[1]
        return None
    world = D.world_size()
    free, total, name = device_memory(device)
    predictor = predictor or BrainPredictor(hparams, brain_class, train_set, world)
    picked = plan_micro_batch(predictor, hparams["batch_size"], world, free)
    gib = _where(free, total, name)
    if picked is None:
        raise MemoryPlanError(refusal(*alternatives(predictor, hparams, world, free), predictor.seconds, gib))
    micro, accum, peak = picked
    hparams["micro_batch_size"], hparams["grad_accumulation_factor"] = micro, accum
    line = (f"memory plan: micro-batch {micro} x accum {accum} x {world} GPU{'s' if world > 1 else ''} = global "
            f"{hparams['batch_size']}; predicted {peak / GIB:.1f} GiB {gib}, longest utterance {predictor.seconds:.1f} s")
    logger.info(line)
    return line


def longest_by_task(train_sets):
    """{task: (item, seconds)} of the longest training utterance of each task over its sources
    (``{TaskSplit or 'task[:source]': dataset}``)."""
    out = {}
    for tag, dataset in train_sets.items():
        task = str(getattr(tag, "task", tag)).split(":")[0]
        item, seconds = longest_item(dataset)
        if task not in out or seconds > out[task][1]:
            out[task] = (item, seconds)
    return out


def plan_task_batch(predictor, hparams, task, world, free, where):
    """One HarmoniFuse task: ``(peak bytes, None)`` when its ``<task>_batch_size`` fits ``free`` bytes, else
    ``(None, refusal)`` naming the largest batch of that task that fits and the settings that would fit.
    The batch is global: each of ``world`` GPUs runs a contiguous share of at most ceil(batch / world)
    utterances (lobes/harmonifuse/interleave.py), and that share is what must fit."""
    want = hparams[f"{task}_batch_size"]
    share = -(-want // world)
    picked = largest_fitting(predictor, list(range(share, 0, -1)), lambda m: 1, world, free)
    if picked is not None and picked[0] == share:
        return picked[2], None
    options, base = alternatives(predictor, hparams, world, free, micro=share, accum=1)
    if picked is not None:
        per_gpu = f": {picked[0]} per GPU" if world > 1 else ""
        options.insert(0, (f"{task}_batch_size {picked[0] * world} (the largest that fits{per_gpu})", picked[2], True))
    return None, refusal(options, base, predictor.seconds, where, f"{task}_batch_size {want}")


def resolve_task_batches(hparams, run_opts, brain_class, train_sets, predictors=None):
    """HarmoniFuse's ``micro_batch_size: auto``: each optimizer step is one task's batch (``<task>_batch_size``,
    global: split over the GPUs) and consecutive batches are of different tasks, so accumulation would mix tasks in one step:
    the plan checks, on CUDA, that each task's batch of its longest utterance fits and logs each batch's
    predicted peak, or stops before any step when a configured batch does not fit, naming the largest batch of
    that task that fits and the settings that would fit at the configured one. Elsewhere (CPU, dynamic batching)
    nothing is planned. ``auto`` then reads as ``null``. ``predictors``: {task: BrainPredictor} to reuse."""
    from lobes import distributed as D

    if hparams["micro_batch_size"] != "auto":
        return None
    hparams["micro_batch_size"] = None
    device = _cuda_device(run_opts)
    if device is None or hparams["dynamic_batching"]:
        return None
    world = D.world_size()
    free, total, name = device_memory(device)
    gib, parts, errors = _where(free, total, name), [], []
    for task, (item, seconds) in longest_by_task(train_sets).items():
        predictor = (predictors or {}).get(task) or BrainPredictor(hparams, brain_class, world=world, item=item,
                                                                   seconds=seconds)
        peak, error = plan_task_batch(predictor, hparams, task, world, free, gib)
        if error:
            errors.append(error)
        else:
            parts.append(f"{task}_batch_size {hparams[f'{task}_batch_size']} ({peak / GIB:.1f} GiB, {seconds:.1f} s)")
    if errors:
        raise MemoryPlanError(" | ".join(errors))
    line = (f"memory plan: one task batch per optimizer step (no accumulation) x {world} "
            f"GPU{'s' if world > 1 else ''}: {', '.join(parts)} predicted {gib}")
    logger.info(line)
    return line
