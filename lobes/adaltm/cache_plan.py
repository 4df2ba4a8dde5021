"""Sizing and planning of the feature caches of a run, all splits together, before any is built.

- :func:`estimate_cache` sizes one split from the manifest durations alone (WavLM's CNN arithmetic).
- :func:`plan_split` decides per split: reuse an existing cache (same :class:`CacheSpec`, every needed utterance
  present with the same duration), or build it (none yet, or stale: the reason names what changed).
- :func:`check_plans` checks the **totals** against the budget of where the caches go: in RAM, the sum over the
  splits of what the DDP ranks of one host hold together against ``feature_cache_max_ram_gb``, which is read
  **per host** (the machine's RAM that its ranks share; one process = one rank); on disk, the reused plus the new
  caches against ``feature_cache_max_disk_gb``, and the new ones against the free space (to which the stale
  caches about to be replaced are added back). A refusal names every split, its size, the budget and what would fit.
- :func:`ram_shards` says which utterances each DDP rank keeps in RAM: those its loader reads. That is fixed
  for validation / test (``ToolkitBrain.make_dataloader`` gives rank r the single-process batches r, r+W, ...)
  and for an unshuffled training set (``DistributedSampler``'s strided share). A shuffled or dynamically batched
  training set is dealt out anew every epoch, so every rank holds the **whole** train split (replicated): the
  budget counts it once per rank of the host, and the build is still split over the ranks and all-gathered
  (:func:`lobes.adaltm.feature_cache.gather_entries`). Over budget, only a disk cache can serve it.
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lobes.adaltm.cache_identity import describe_change
from lobes.errors import DataError

SAMPLE_RATE = 16000
# WavLM's CNN (every released WavLM / wav2vec2): receptive field 400 samples, total stride 320
WAVLM_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
WAVLM_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
# per utterance: its safetensors header entry + its index.json entries (shard, duration); measured 221 B for
# MSP-Podcast ids ("MSP-PODCAST_0001_0008"), index header included (tests/test_feature_cache.py)
HEADER_BYTES_PER_ENTRY = 256
INDEX_FILE = "index.json"
FORMAT = "feature-cache-v3"
GB = 1e9


class CacheBudgetError(DataError):
    """The caches would not fit the configured RAM/disk budget (raised before anything is computed)."""


def conv_frames(num_samples, conv_kernel=WAVLM_CONV_KERNEL, conv_stride=WAVLM_CONV_STRIDE):
    """Frames the CNN outputs for ``num_samples`` samples (HF ``_get_feat_extract_output_lengths``)."""
    n = int(num_samples)
    for k, s in zip(conv_kernel, conv_stride):
        n = (n - k) // s + 1
    return max(n, 0)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds; stored in index.json and compared when an existing cache is reused."""
    num_hidden: int          # L+1 hidden states (CNN output + L transformer layers)
    hidden_size: int         # D
    dtype: str               # e.g. "float32"
    pooled: bool             # [L+1, D] per utterance (masked mean over time) instead of [T, L+1, D]
    identity: dict = field(default_factory=dict, hash=False)  # content hashes of what the features depend on

    def view(self):
        """One flat mapping of the shape fields and the identity (what :func:`describe_change` compares)."""
        return {**{k: v for k, v in asdict(self).items() if k != "identity"}, **self.identity}


@dataclass
class CacheEstimate:
    utterances: int
    audio_seconds: float
    frames: int
    bytes: int

    def describe(self, spec):
        shape = "[L+1, D]" if spec.pooled else "[T, L+1, D]"
        return (f"{human_bytes(self.bytes)} for {self.utterances:,} utterances ({self.audio_seconds / 3600:.1f} h, "
                f"{self.frames:,} frames), {shape} = {spec.num_hidden} x {spec.hidden_size} {spec.dtype} "
                f"{'per utterance' if spec.pooled else 'per frame'}")


def human_bytes(n):
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def estimate_cache(durations, spec, conv_kernel=WAVLM_CONV_KERNEL, conv_stride=WAVLM_CONV_STRIDE,
                   sample_rate=SAMPLE_RATE):
    """Size of a cache from the manifest durations alone (seconds per utterance), before computing anything."""
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    durations = list(durations)
    frames = sum(conv_frames(round(d * sample_rate), conv_kernel, conv_stride) for d in durations)
    per_vector = spec.num_hidden * spec.hidden_size * itemsize
    data = per_vector * (len(durations) if spec.pooled else frames)
    return CacheEstimate(len(durations), float(sum(durations)), frames,
                         data + HEADER_BYTES_PER_ENTRY * len(durations))


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class SplitPlan:
    split: str
    utterances: list           # [(utt_id, duration)] the run needs
    keep: set                  # the ids this rank computes and holds (in RAM); every id on disk
    action: str                # "reuse" | "build" | "rebuild"
    reason: str = ""           # why an existing cache is stale
    estimate: CacheEstimate = None
    existing_bytes: int = 0    # on-disk size of the reused or stale cache


def read_meta(folder):
    """index.json of a cache folder; DataError naming it when unreadable or of another format."""
    path = Path(folder) / INDEX_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"feature cache index '{path}' cannot be read ({e}); delete '{folder}' to rebuild it") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"feature cache '{folder}' has format {meta.get('format')!r}, not {FORMAT!r}")
    return meta


def stale_reason(meta, spec, utterances):
    """'' when the cache in ``meta`` holds exactly this run's features for ``utterances``, else what differs."""
    old = CacheSpec(**meta["spec"])
    changes = describe_change(old.view(), spec.view())
    durations = meta.get("durations", {})
    missing = [u for u, _ in utterances if u not in durations]
    moved = [(u, durations[u], d) for u, d in utterances if u in durations and durations[u] != d]
    if missing:
        changes.append(f"{len(missing)} utterances not in it (e.g. {missing[:3]})")
    if moved:
        u, a, b = moved[0]
        changes.append(f"{len(moved)} utterances changed duration (e.g. '{u}': {a} s -> {b} s)")
    return "; ".join(changes)


def plan_split(split, utterances, keep, spec, cache_dir):
    """Reuse or (re)build one split (see the module docstring); nothing is written here."""
    plan = SplitPlan(split, utterances, keep, "build")
    final = Path(cache_dir) / split if cache_dir is not None else None
    if final is not None and final.exists():
        plan.existing_bytes = folder_bytes(final)
        try:
            plan.reason = stale_reason(read_meta(final), spec, utterances)
        except (DataError, TypeError, KeyError) as e:  # unreadable, another format, another spec layout
            plan.reason = str(e)
        plan.action = "rebuild" if plan.reason else "reuse"
    if plan.action != "reuse":
        plan.estimate = estimate_cache([d for u, d in utterances if u in keep], spec)
    return plan


def remove_leftovers(cache_dir, splits):
    """Temp folders of killed builds (``.<split>.tmp``): removed before the free space is measured."""
    for split in splits:
        shutil.rmtree(Path(cache_dir) / f".{split}.tmp", ignore_errors=True)


def ranks_per_host(world):
    """DDP ranks that share this host's RAM: torchrun's ``LOCAL_WORLD_SIZE``, else all ``world`` (one host)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def replicated_splits(shards):
    """Splits that every rank holds whole (a training set dealt out anew every epoch, :func:`ram_shards`)."""
    if shards is None or len(shards) < 2:
        return []
    return [s for s in shards[0] if all(sh[s] == shards[0][s] for sh in shards[1:])]


def _ram_totals(plans, spec, ram_shards, per_host):
    """(bytes, where) of the in-RAM caches of all splits: the host whose ranks hold the most, summed over its ranks
    (ranks r*per_host ... are on host r, as torchrun numbers them); every rank checks the same number."""
    if ram_shards is None:
        return sum(p.estimate.bytes for p in plans), "in RAM"
    durations = {p.split: dict(p.utterances) for p in plans}
    per_rank = [sum(estimate_cache([durations[p.split][u] for u in shard[p.split]], spec).bytes for p in plans)
                for shard in ram_shards]
    if len(per_rank) == 1:
        return per_rank[0], "in RAM"
    hosts = [per_rank[i:i + per_host] for i in range(0, len(per_rank), per_host)]
    host = max(hosts, key=sum)
    return sum(host), (f"per host ({len(host)} DDP ranks of {len(per_rank)} on it: "
                       f"{' + '.join(human_bytes(b) for b in host)})")


def check_plans(plans, spec, cache_dir, max_ram_gb, max_disk_gb, ram_shards=None, per_host=1):
    """Raise :class:`CacheBudgetError` when the caches of all splits together exceed their budget.

    ``ram_shards``: the ids each DDP rank keeps in RAM (:func:`ram_shards`); ``per_host``: how many of the ranks
    share one host's RAM (``feature_cache_max_ram_gb`` is per host)."""
    new = [p for p in plans if p.action != "reuse"]
    if not new:
        return
    if cache_dir is None:
        (total, where), limit = _ram_totals(plans, spec, ram_shards, per_host), max_ram_gb * GB
        if total > limit:
            fix = "set feature_cache_dir to stream the caches to disk, raise feature_cache_max_ram_gb"
            whole = replicated_splits(ram_shards)
            if whole:
                fix = (f"set feature_cache_dir to a folder on a filesystem all ranks share ({whole} is dealt to the "
                       "ranks anew every epoch (sorting: random or dynamic_batching: True), so every rank holds all "
                       f"of it), raise feature_cache_max_ram_gb (per host) to {math.ceil(total / GB)}")
            raise CacheBudgetError(refusal(plans, spec, f"{human_bytes(total)} {where}", total,
                                           f"feature_cache_max_ram_gb: {max_ram_gb} ({human_bytes(limit)})", limit,
                                           fix))
        return
    total = sum(p.existing_bytes if p.action == "reuse" else p.estimate.bytes for p in plans)
    limit = max_disk_gb * GB
    if total > limit:
        raise CacheBudgetError(refusal(plans, spec, f"{human_bytes(total)} on disk", total,
                                       f"feature_cache_max_disk_gb: {max_disk_gb} ({human_bytes(limit)})", limit,
                                       "raise feature_cache_max_disk_gb"))
    probe = Path(cache_dir)
    while not probe.exists():
        probe = probe.parent
    need = sum(p.estimate.bytes for p in new)
    free = shutil.disk_usage(probe).free + sum(p.existing_bytes for p in new)  # stale caches are removed first
    if need > free:
        raise CacheBudgetError(refusal(plans, spec, f"{human_bytes(need)} to write", need,
                                       f"the free space of feature_cache_dir '{cache_dir}' ({human_bytes(free)}, "
                                       "counting the stale caches it replaces)", free,
                                       "point feature_cache_dir elsewhere"))


def refusal(plans, spec, total_text, total, budget_text, budget, first_fix):
    """The refusal message: each split and its size, the total, the budget, and which settings would fit."""
    lines = []
    for p in plans:
        size = (f"{human_bytes(p.existing_bytes)} (reused)" if p.action == "reuse" else p.estimate.describe(spec))
        lines.append(f"  {p.split}: {size}")
    fits = []
    for label, alt in alternatives(spec):
        scaled = round(total * alt_ratio(plans, spec, alt))
        fits.append(f"{label}: {human_bytes(scaled)} ({'fits' if scaled <= budget else 'does not fit'})")
    return (f"feature caches of splits {[p.split for p in plans]} need {total_text} together, over {budget_text}; "
            f"nothing was computed.\n" + "\n".join(lines) +
            f"\nWith other settings, against the same {human_bytes(budget)}: " + "; ".join(fits) +
            f".\nTo go on: {first_fix}, or change a setting above, or cache_features: False (recompute every batch), "
            "or feature_cache_over_budget: recompute.")


def alternatives(spec):
    """Settings that shrink a cache: fp16 and / or the pooled cache (the latter needs ser_head_type: pooled_linear)."""
    out = []
    if spec.dtype == "float32":
        out.append(("cache_dtype: !name:torch.float16", replace(spec, dtype="float16")))
    if not spec.pooled:
        out.append(("feature_cache_pooled: True (with ser_head_type: pooled_linear)", replace(spec, pooled=True)))
    if spec.dtype == "float32" and not spec.pooled:
        out.append(("both", replace(spec, dtype="float16", pooled=True)))
    return out


def alt_ratio(plans, spec, alt):
    durations = [d for p in plans for _, d in p.utterances]
    return estimate_cache(durations, alt).bytes / max(estimate_cache(durations, spec).bytes, 1)


# ------------------------------------------------------------------------------------------------ DDP shards
def ram_shards(hparams, datasets, world):
    """[{split: ids rank r reads}] for r < world, for an in-RAM cache under DDP (see the module docstring).

    A training set the sampler deals out anew every epoch (``sorting: random`` or ``dynamic_batching: True``) has
    no fixed shard: every rank gets all of it. Run under DDP: the evaluation loaders' micro-batch is the one
    ``lobes.dataio.loader_kwargs`` derives for this process's world size."""
    from torch.utils.data import DistributedSampler

    from lobes import distributed as D
    from lobes.dataio import loader_kwargs

    if hparams["micro_batch_size"] == "auto":  # the evaluation shards follow the planned micro-batch
        raise RuntimeError("micro_batch_size: auto must be planned (lobes.memory_plan.resolve_micro_batch) before "
                           "an in-RAM feature cache is sharded over the DDP ranks")
    shards = [{} for _ in range(world)]
    for split, ds in datasets.items():
        ids = list(ds.data_ids)
        if split == "train":
            if hparams["dynamic_batching"] or hparams["sorting"] == "random":  # dealt anew every epoch
                for r in range(world):
                    shards[r][split] = set(ids)
                continue
            for r in range(world):  # SpeechBrain's train sampler under DDP with sorting other than random
                sampler = DistributedSampler(ds, num_replicas=world, rank=r, shuffle=False)
                shards[r][split] = {ids[i] for i in sampler}
            continue
        kwargs = loader_kwargs(hparams, ds, train=False)
        for r in range(world):
            sampler = D.shard_batches(ds, kwargs, r, world)[0]["batch_sampler"]
            shards[r][split] = {ids[i] for batch in sampler for i in batch}
    return shards
