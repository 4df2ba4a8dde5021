"""Feature caching for setups whose backbone never changes during training (Setup 1, static λ).

Nothing upstream of the hidden states trains, so recomputing WavLM every epoch is wasted work: the hidden
states are computed once and the α + head training reads them back. At the paper's scale this needs care
(issue 13.2), so a cache is

- **identified by content**: the spec stored in its ``index.json`` holds content hashes of everything the
  features depend on (base weights, each task vector, λ, normalisation, a pooled cache's head;
  :mod:`lobes.adaltm.cache_identity`) and each utterance's duration; a mismatch rebuilds it, logged with what
  changed ("feature cache <dir> is stale: task vector ASR changed; rebuilding").
- **sized before anything is computed, all splits together**: :func:`estimate_cache` counts the frames of every
  utterance from the manifest durations with WavLM's CNN arithmetic (stride 320 at 16 kHz, 50 frames/s), times
  (L+1)·D·bytes; the splits' total is checked (:func:`lobes.adaltm.cache_plan.check_plans`) against
  ``feature_cache_max_ram_gb`` in memory, ``feature_cache_max_disk_gb`` and the free space on disk, and the run
  stops before any split is built with each split's size and what would fit (:class:`CacheBudgetError`), or —
  ``feature_cache_over_budget: recompute`` — logs it and recomputes.
- **streamed to disk in shards**: utterances are written to safetensors shards of ``shard_mb`` each plus an
  ``index.json`` (utterance -> shard), inside a temp folder that is renamed to ``<cache_dir>/<split>/`` only
  when complete. Peak RAM is one shard + one batch, whatever the corpus size (benchmarks/RESULTS.md).
- **batched on the training device and sharded across DDP ranks**: on disk, rank r computes utterances
  ``r::world`` (sorted ids) and every rank reads the shared folder; in RAM, each rank computes and keeps only the
  utterances its loaders read (:func:`lobes.adaltm.cache_plan.ram_shards`). A training set dealt out anew every
  epoch (``sorting: random``, dynamic batching) is held whole by every rank: rank r computes ``r::world`` and
  :func:`gather_entries` sends every rank's features to all (halves the one-off WavLM pass on 2 GPUs, the
  dominant cost of a cached run; benchmarks/RESULTS.md §9). Batches are duration-sorted, at most
  ``batch_seconds`` padded seconds, on ``device``.
- optionally **pooled**: ``pooled=True`` stores the per-layer masked mean over time, [L+1, D] per utterance
  instead of [T, L+1, D] (~280x smaller at 5.6 s). Exact only for a head whose first op is a linear frame
  projection followed by masked mean pooling (``SERHead(head_type="pooled_linear")``), since
  mean_t(W Σ_l α_l h_lt + b) = W Σ_l α_l mean_t(h_lt) + b; :func:`check_pooled_exact` refuses other heads.

Entries are [T, L+1, D] (time first, so SpeechBrain's PaddedBatch pads and measures time) or [L+1, D].
"""
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import speechbrain as sb
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lobes.adaltm.cache_identity import cache_identity, load_memo, save_memo
from lobes.adaltm.cache_plan import (  # noqa: F401 (sizing API re-exported: estimate_cache, conv_frames, ...)
    FORMAT, GB, HEADER_BYTES_PER_ENTRY, INDEX_FILE, CacheBudgetError, CacheEstimate, CacheSpec, check_plans, conv_frames,
    dtype_name, estimate_cache, human_bytes, plan_split, ram_shards, ranks_per_host, read_meta, remove_leftovers,
    replicated_splits)
from lobes.adaltm.merged_wavlm import _release_freed_memory as release_freed_memory
from lobes.errors import DataError
from lobes.io_utils import atomic_write, hold_lock

logger = logging.getLogger(__name__)


def check_pooled_exact(weighted_sum, ser_head):
    """A pooled cache gives the frame-level logits only for a linear-projection + mean-pooling head."""
    if not getattr(ser_head, "poolable", False):
        raise ValueError("feature_cache_pooled: True needs ser_head_type: pooled_linear (a linear frame projection "
                         f"before mean pooling); the head is '{getattr(ser_head, 'head_type', type(ser_head).__name__)}'")
    if getattr(weighted_sum, "layer_norm", False):
        raise ValueError("feature_cache_pooled: True is not exact with a per-frame layer norm in the weighted layer "
                         "sum (weighted_sum layer_norm: True): the norm does not commute with the mean over time")


# ------------------------------------------------------------------------------------------------ compute
def make_batches(utterances, batch_seconds):
    """Duration-sorted (longest first) batches of (id, duration) of at most ``batch_seconds`` padded seconds."""
    batches, cur = [], []
    for uid, dur in sorted(utterances, key=lambda u: (-u[1], u[0])):
        if cur and (len(cur) + 1) * cur[0][1] > batch_seconds:
            batches.append(cur)
            cur = []
        cur.append((uid, dur))
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def compute_batched(encoder, utterances, load, device, dtype, pooled, batch_seconds):
    """Yield (utt_id, CPU tensor) for every (id, duration) in ``utterances``, batched on ``device``."""
    encoder.eval()
    for batch in make_batches(utterances, batch_seconds):
        wavs = [load(uid).reshape(-1) for uid, _ in batch]
        n = torch.tensor([w.numel() for w in wavs])
        padded = torch.zeros(len(wavs), int(n.max()))
        for i, w in enumerate(wavs):
            padded[i, : w.numel()] = w
        hidden, mask = encoder(padded.to(device), (n.float() / n.max()).to(device))  # [L+1, B, T, D], [B, T]
        for i, (uid, _) in enumerate(batch):
            t = int(mask[i].sum())
            h = hidden[:, i, :t]  # [L+1, T, D]
            out = h.mean(dim=1) if pooled else h.transpose(0, 1)  # [L+1, D] or [T, L+1, D]
            yield uid, out.to(dtype).cpu().contiguous()


def rank_share(utterances, rank, world):
    """The utterances rank ``rank`` of ``world`` computes: ``r::world`` of the id-sorted list."""
    return sorted(utterances)[rank::world]


class ShardWriter:
    """Accumulates entries and writes a safetensors shard whenever ``shard_bytes`` are held."""

    def __init__(self, folder, prefix, shard_bytes):
        self.folder, self.prefix, self.shard_bytes = Path(folder), prefix, shard_bytes
        self.buf, self.size, self.index, self.shards = {}, 0, {}, 0

    def add(self, uid, tensor):
        self.buf[uid] = tensor
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self):
        if not self.buf:
            return
        name = f"{self.prefix}-{self.shards:05d}.safetensors"
        save_file(self.buf, str(self.folder / name))
        self.index.update({uid: name for uid in self.buf})
        self.buf, self.size, self.shards = {}, 0, self.shards + 1
        # glibc keeps freed medium-sized blocks in its heap: without this, resident memory would still grow
        # with the number of shards written (measured: +280 MiB at 4x corpus), although live tensors do not
        release_freed_memory()


def build_rank(encoder, utterances, load, tmp_dir, spec, rank=0, world=1, device="cpu", batch_seconds=160.0,
               shard_bytes=256 * 2 ** 20):
    """Rank ``rank``'s part of a disk cache: shards ``r<rank>-*.safetensors`` and, last, ``index-r<rank>.json``."""
    writer = ShardWriter(tmp_dir, f"r{rank}", shard_bytes)
    share = rank_share(utterances, rank, world)
    for uid, feats in compute_batched(encoder, share, load, device, getattr(torch, spec.dtype), spec.pooled,
                                      batch_seconds):
        writer.add(uid, feats)
    writer.flush()
    with atomic_write(Path(tmp_dir) / f"index-r{rank}.json") as f:  # written last: this rank is complete
        json.dump(writer.index, f)
    return writer.index


def finalize(tmp_dir, final_dir, spec, world, expected_ids):
    """Merge the ranks' indexes (every utterance exactly once), write index.json, rename temp -> final.

    expected_ids: the utterance ids, or {id: manifest duration} (stored: a later run with other durations under
    the same ids, e.g. re-segmented audio, rebuilds instead of reading these features)."""
    tmp_dir, index = Path(tmp_dir), {}
    for r in range(world):
        part = tmp_dir / f"index-r{r}.json"
        if not part.exists():
            raise DataError(f"feature cache build in '{tmp_dir}': rank {r} did not finish ({part.name} missing)")
        for uid, shard in json.loads(part.read_text()).items():
            if uid in index:
                raise DataError(f"feature cache build in '{tmp_dir}': utterance '{uid}' written by two ranks")
            index[uid] = shard
    missing = sorted(set(expected_ids) - set(index))
    if missing:
        raise DataError(f"feature cache build in '{tmp_dir}': {len(missing)} utterances missing, e.g. {missing[:5]}")
    with atomic_write(tmp_dir / INDEX_FILE) as f:
        json.dump({"format": FORMAT, "spec": asdict(spec), "index": index,
                   "durations": expected_ids if isinstance(expected_ids, dict) else {}}, f)
    if Path(final_dir).exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def ram_entries(encoder, plan, load, spec, device, batch_seconds, split_over=None, round_bytes=256 * 2 ** 20):
    """{utt_id: features} this process keeps in RAM for ``plan``: the ids in ``plan.keep``, computed here; or, for
    a split every rank holds whole, ``split_over=(rank, world)``: this rank's ``r::world`` share computed here and
    every rank's share gathered (:func:`gather_entries`)."""
    mine = [u for u in plan.utterances if u[0] in plan.keep]
    if split_over is not None:
        _check_same_ids(plan.split, [u for u, _ in mine])
        mine = rank_share(mine, *split_over)
    feats = dict(compute_batched(encoder, mine, load, device, getattr(torch, spec.dtype), spec.pooled, batch_seconds))
    return feats if split_over is None else gather_entries(feats, round_bytes)


def _check_same_ids(split, ids):
    """DataError on every rank when the ranks list different utterances for a split they share out ``r::world``
    (each would compute a share of another list: utterances dropped or computed twice, found only mid-training)."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    seen = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, (len(ids), digest))
    if len(set(seen)) > 1:
        raise DataError(f"in-RAM feature cache of '{split}': the DDP ranks list different utterances (count, digest "
                        f"per rank: {seen}); every rank must read the same manifest")


def gather_entries(local, round_bytes=256 * 2 ** 20):
    """Every rank's {utt_id: CPU tensor} on every rank (all-gather over the initialised process group).

    Each rank sends its entries as raw bytes in rounds of at most ``round_bytes`` (one entry at least) and drops
    them from ``local`` once sent (they come back in the result), so what is held beyond the result is one
    round's buffers of all ranks, not this rank's share twice; on CUDA (NCCL) the buffers are on the device."""
    dist = torch.distributed
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else "cpu"
    rounds, size = [[]], 0
    for uid, t in local.items():
        nbytes = t.numel() * t.element_size()
        if rounds[-1] and size + nbytes > round_bytes:
            rounds.append([])
            size = 0
        rounds[-1].append((uid, tuple(t.shape), dtype_name(t.dtype), nbytes))
        size += nbytes
    layouts = [None] * world
    dist.all_gather_object(layouts, rounds)
    out = {}
    for k in range(max(len(lay) for lay in layouts)):
        parts = [lay[k] if k < len(lay) else [] for lay in layouts]
        longest = max(sum(e[3] for e in part) for part in parts)
        if not longest:  # no rank has an entry (an empty split)
            continue
        send = torch.zeros(longest, dtype=torch.uint8, device=device)
        if parts[dist.get_rank()]:
            flat = torch.cat([local[uid].reshape(-1).view(torch.uint8) for uid, *_ in parts[dist.get_rank()]])
            send[: flat.numel()] = flat.to(device)
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send)
        for uid, *_ in parts[dist.get_rank()]:
            del local[uid]
        for part, buf in zip(parts, recv):
            buf, offset = buf.cpu(), 0
            for uid, shape, dtype, nbytes in part:
                if uid in out:
                    raise DataError(f"in-RAM feature cache: utterance '{uid}' computed by two ranks")
                out[uid] = buf[offset: offset + nbytes].clone().view(getattr(torch, dtype)).view(shape)
                offset += nbytes
        del send, recv
    return out


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier():
    if _dist()[1] > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------ reading
class FeatureCache:
    """Hidden states per utterance id, from memory (``feats``) or a sharded folder (``folder``)."""

    def __init__(self, feats=None, folder=None, max_open=64):
        self.feats, self.folder, self.max_open = feats, folder, max_open
        self.spec, self.index, self._handles = None, None, OrderedDict()
        if folder is not None:
            meta = read_meta(folder)
            self.spec, self.index = CacheSpec(**meta["spec"]), meta["index"]

    def __len__(self):
        return len(self.feats if self.feats is not None else self.index)

    def ids(self):
        return set(self.feats if self.feats is not None else self.index)

    def _handle(self, shard):
        h = self._handles.pop(shard, None)
        if h is None:
            if len(self._handles) >= self.max_open:  # bounded: a 4 TB cache has ~16k shards
                self._handles.popitem(last=False)
            h = safe_open(str(Path(self.folder) / shard), framework="pt")
        self._handles[shard] = h
        return h

    def __getitem__(self, utt_id):
        if self.feats is not None:
            if utt_id not in self.feats:  # under DDP a rank holds only the utterances its loader reads
                raise DataError(f"utterance '{utt_id}' is not in this process's in-RAM feature cache "
                                f"({len(self.feats)} utterances): its loader reads other utterances than planned")
            return self.feats[utt_id]
        shard = self.index.get(utt_id)
        if shard is None:
            raise DataError(f"feature cache '{self.folder}' has no entry for utterance '{utt_id}'")
        return self._handle(shard).get_tensor(utt_id)

    def pipeline(self):
        """A SpeechBrain dynamic item: utterance id -> ``feats``."""
        @sb.utils.data_pipeline.takes("id")
        @sb.utils.data_pipeline.provides("feats")
        def feats(utt_id):
            return self[utt_id].float()
        return feats

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, encoder, utterances, load, spec, split="train", cache_dir=None, device="cpu",
              batch_seconds=160.0, shard_mb=256, max_ram_gb=16.0, max_disk_gb=500.0, rank=None, world=None):
        """The cache of one split: :func:`build_caches` with that split alone."""
        return build_caches(encoder, {split: (utterances, load)}, spec, cache_dir, device, batch_seconds, shard_mb,
                            max_ram_gb, max_disk_gb, rank=rank, world=world)[split]


def lock_path(cache_dir, rank):
    """The lock file of ``cache_dir`` for one rank: ``.<name>.lock.rank<r>`` beside the folder."""
    folder = Path(cache_dir).absolute()
    return folder.parent / f".{folder.name}.lock.rank{rank}"


def build_caches(encoder, sources, spec, cache_dir=None, device="cpu", batch_seconds=160.0, shard_mb=256,
                 max_ram_gb=16.0, max_disk_gb=500.0, shards=None, memo=None, rank=None, world=None):
    """Plan every split, check them together, then build the missing or stale ones; {split: FeatureCache}.

    sources: {split: ([(utt_id, duration s)], load(utt_id) -> waveform)}. Without ``cache_dir`` the caches are
    held in RAM: each process computes and keeps ``shards[rank][split]`` (the ids its loaders read under DDP,
    :func:`lobes.adaltm.cache_plan.ram_shards`), every id when ``shards`` is None; a split that every rank holds
    whole is computed ``r::world`` and all-gathered. With it, shards go to
    ``<cache_dir>/<split>/`` (rank r computes ids r::world; rank 0 publishes each split with one rename).
    Nothing is written before the check passes, except that the temp folders of a killed build are removed
    first (they would count against the free space). ``memo``: file digests, saved beside the caches.
    """
    r, w = _dist() if rank is None else (rank, world)
    if cache_dir is not None:
        # one run per folder: another run's rank r would remove the temp shards this one writes or replace the
        # caches it reads (rows side by side: run.sh --nj); a lock per rank, so a run's own ranks never clash.
        # Beside the folder, not in it: nothing is created in cache_dir before the budget check passes
        hold_lock(lock_path(cache_dir, r), f"feature_cache_dir '{cache_dir}'")
        if r == 0:
            remove_leftovers(cache_dir, sources)
        _barrier()
    plans = {}
    for split, (utterances, _) in sources.items():
        keep = shards[r][split] if shards is not None and cache_dir is None else {u for u, _ in utterances}
        plans[split] = plan_split(split, utterances, keep, spec, cache_dir)
    check_plans(list(plans.values()), spec, cache_dir, max_ram_gb, max_disk_gb, shards if cache_dir is None else None,
                ranks_per_host(w))
    for split, p in plans.items():
        where = Path(cache_dir) / split if cache_dir is not None else "in RAM"
        if p.action == "reuse":
            logger.info("feature cache %s: reusing %s", split, where)
        elif p.action == "rebuild":
            logger.warning("feature cache %s is stale: %s; rebuilding (%s)", where, p.reason, p.estimate.describe(spec))
        else:
            logger.info("feature cache %s (%s): %s", split, where, p.estimate.describe(spec))
    if cache_dir is None:
        whole = replicated_splits(shards) if w > 1 else []
        return {split: FeatureCache(feats=ram_entries(encoder, p, sources[split][1], spec, device, batch_seconds,
                                                      (r, w) if split in whole else None, int(shard_mb * 2 ** 20)))
                for split, p in plans.items()}
    if r == 0 and memo is not None:
        save_memo(cache_dir, memo)
    _barrier()  # every rank has read the stale indexes before rank 0 replaces them
    caches = {}
    for split, p in plans.items():
        final, tmp = Path(cache_dir) / split, Path(cache_dir) / f".{split}.tmp"
        if p.action != "reuse":
            if r == 0:
                shutil.rmtree(final, ignore_errors=True)  # a stale cache: its space is counted as free
                tmp.mkdir(parents=True)
            _barrier()
            build_rank(encoder, p.utterances, sources[split][1], tmp, spec, r, w, device, batch_seconds,
                       int(shard_mb * 2 ** 20))
            _barrier()
            if r == 0:
                finalize(tmp, final, spec, w, dict(p.utterances))
            _barrier()
        caches[split] = FeatureCache(folder=final)
    return caches


def cached_hidden(feats, lens):
    """A batch of cache entries -> (hidden [L+1, B, T, D], frame mask [B, T]) as the backbone returns them.

    Pooled entries [B, L+1, D] become one frame per utterance: the head's masked mean over that frame is
    the identity, so a ``pooled_linear`` head computes W Σ_l α_l mean_t(h_lt) + b (exactly its frame-level
    output)."""
    from lobes.wavlm_encoder import lengths_to_mask

    if feats.dim() == 3:  # pooled
        return feats.transpose(0, 1).unsqueeze(2), torch.ones(feats.shape[0], 1, dtype=torch.bool,
                                                                 device=feats.device)
    return feats.permute(2, 0, 1, 3), lengths_to_mask(lens, feats.shape[1])


def dataset_source(dataset):
    """(utterances [(id, duration)], load) of a SpeechBrain DynamicItemDataset with ``duration`` and ``sig``."""
    ids = list(dataset.data_ids)
    pos = {uid: i for i, uid in enumerate(ids)}
    utterances = [(uid, float(dataset.data[uid]["duration"])) for uid in ids]

    def load(uid):
        with dataset.output_keys_as(["sig"]):
            return dataset[pos[uid]]["sig"]
    return utterances, load


def spec_for(wavlm, dtype, pooled, identity=None):
    """The spec of ``wavlm``'s cache; ``identity`` defaults to :func:`cache_identity` of ``wavlm`` alone (task vectors
    hashed from its tensors, no file memo)."""
    return CacheSpec(num_hidden=wavlm.num_layers + 1, hidden_size=wavlm.hidden_size, dtype=dtype_name(dtype),
                     pooled=bool(pooled), identity=cache_identity(wavlm) if identity is None else identity)


def _from_rank0(fn):
    """``fn()`` computed on rank 0 and sent to every rank (file hashing reads each file once, not once per rank)."""
    r, w = _dist()
    if w == 1:
        return fn()
    out = [fn() if r == 0 else None]
    torch.distributed.broadcast_object_list(out, src=0)
    return out[0]


def cache_datasets(hparams, datasets, device):
    """{split: FeatureCache} of a recipe's datasets (every split planned and checked before any is built), or None
    when they are over budget and ``feature_cache_over_budget: recompute``."""
    wavlm, pooled, cache_dir = hparams["wavlm"], hparams["feature_cache_pooled"], hparams["feature_cache_dir"]
    world = _dist()[1]
    shards = ram_shards(hparams, datasets, world) if cache_dir is None and world > 1 else None
    memo, identity = None, {}  # an in-RAM cache is built by this run for this run: nothing to compare
    if cache_dir is not None:
        memo = load_memo(cache_dir)
        head = hparams["ser_head"] if pooled else None
        identity = _from_rank0(lambda: cache_identity(wavlm, hparams["task_vectors"], head, memo))
    spec = spec_for(wavlm, hparams["cache_dtype"], pooled, identity)
    sources = {split: dataset_source(ds) for split, ds in datasets.items()}
    try:
        return build_caches(wavlm, sources, spec, cache_dir, device, hparams["feature_cache_batch_seconds"],
                            hparams["feature_cache_shard_mb"], hparams["feature_cache_max_ram_gb"],
                            hparams["feature_cache_max_disk_gb"], shards, memo)
    except CacheBudgetError as e:
        if hparams["feature_cache_over_budget"] != "recompute":
            raise
        logger.warning("%s -- feature_cache_over_budget: recompute, so WavLM runs on every batch", e)
        return None
