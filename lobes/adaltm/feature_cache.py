"""Feature caching for setups whose backbone never changes during training (Setup 1, static λ).

Nothing upstream of the hidden states trains, so recomputing WavLM every epoch is wasted work: the hidden
states are computed once and the α + head training reads them back. At the paper's scale this needs care
(issue 13.2), so a cache is

- **sized before anything is computed**: :func:`estimate_cache` counts the frames of every utterance from the
  manifest durations with WavLM's CNN arithmetic (stride 320 at 16 kHz, 50 frames/s), times (L+1)·D·bytes.
  Over the configured budget (``feature_cache_max_ram_gb`` in memory, ``feature_cache_max_disk_gb`` and the
  free space on disk) the run stops at once with the estimate and the setting to change
  (:class:`CacheBudgetError`), or — ``feature_cache_over_budget: recompute`` — logs it and recomputes.
- **streamed to disk in shards**: utterances are written to safetensors shards of ``shard_mb`` each plus an
  ``index.json`` (utterance -> shard), inside a temp folder that is renamed to ``<cache_dir>/<split>/`` only
  when complete. Peak RAM is one shard + one batch, whatever the corpus size (benchmarks/RESULTS.md).
- **batched on the training device and sharded across DDP ranks**: rank r computes utterances ``r::world``
  (sorted ids) in duration-sorted batches of at most ``batch_seconds`` padded seconds on ``device``.
- optionally **pooled**: ``pooled=True`` stores the per-layer masked mean over time, [L+1, D] per utterance
  instead of [T, L+1, D] (~280x smaller at 5.6 s). Exact only for a head whose first op is a linear frame
  projection followed by masked mean pooling (``SERHead(head_type="pooled_linear")``), since
  mean_t(W Σ_l α_l h_lt + b) = W Σ_l α_l mean_t(h_lt) + b; :func:`check_pooled_exact` refuses other heads.

Entries are [T, L+1, D] (time first, so SpeechBrain's PaddedBatch pads and measures time) or [L+1, D].
"""
import json
import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import speechbrain as sb
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lobes.adaltm.merged_wavlm import _release_freed_memory as release_freed_memory
from lobes.errors import DataError
from lobes.io_utils import atomic_write

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# WavLM's CNN (every released WavLM / wav2vec2): receptive field 400 samples, total stride 320
WAVLM_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
WAVLM_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
HEADER_BYTES_PER_ENTRY = 128  # safetensors header + index.json line per utterance (measured ≤ 100 for short ids)
INDEX_FILE = "index.json"
FORMAT = "feature-cache-v2"
GB = 1e9


class CacheBudgetError(DataError):
    """The cache would not fit the configured RAM/disk budget (raised before anything is computed)."""


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
    backbone: str = ""       # the backbone's identity: source + λ (a changed λ must not reuse a cache)


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


def check_budget(estimate, spec, split, cache_dir, max_ram_gb, max_disk_gb):
    """Raise :class:`CacheBudgetError` when the estimate exceeds the budget of where the cache goes."""
    what = f"feature cache of split '{split}': {estimate.describe(spec)}"
    fixes = ("set cache_dtype: !name:torch.float16 (halves it), use the pooled cache (feature_cache_pooled: True "
             "with ser_head_type: pooled_linear, 1/frames the size), or cache_features: False (recompute)")
    if cache_dir is None:
        if estimate.bytes > max_ram_gb * GB:
            raise CacheBudgetError(
                f"{what} exceeds feature_cache_max_ram_gb: {max_ram_gb} ({human_bytes(max_ram_gb * GB)}). "
                f"Set feature_cache_dir to stream it to disk, raise feature_cache_max_ram_gb, or {fixes}.")
        return
    if estimate.bytes > max_disk_gb * GB:
        raise CacheBudgetError(
            f"{what} exceeds feature_cache_max_disk_gb: {max_disk_gb} ({human_bytes(max_disk_gb * GB)}). "
            f"Raise feature_cache_max_disk_gb, or {fixes}.")
    probe = Path(cache_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if estimate.bytes > free:
        raise CacheBudgetError(f"{what} exceeds the free space of feature_cache_dir '{cache_dir}' "
                               f"({human_bytes(free)} free). Point feature_cache_dir elsewhere, or {fixes}.")


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
    """Merge the ranks' indexes (every utterance exactly once), write index.json, rename temp -> final."""
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
        json.dump({"format": FORMAT, "spec": asdict(spec), "index": index}, f)
    if Path(final_dir).exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


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
            meta = self.read_index(folder)
            self.spec, self.index = CacheSpec(**meta["spec"]), meta["index"]

    @staticmethod
    def read_index(folder):
        path = Path(folder) / INDEX_FILE
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"feature cache index '{path}' cannot be read ({e}); delete '{folder}' to rebuild it") from e
        if meta.get("format") != FORMAT:
            raise DataError(f"feature cache '{folder}' has format {meta.get('format')!r}, not {FORMAT!r}; "
                            "delete it to rebuild")
        return meta

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
        """Size-check, then build (or reuse) the cache of one split.

        utterances: [(utt_id, duration in s)]; load(utt_id) -> waveform tensor. Without ``cache_dir`` the
        cache is held in memory (each DDP rank computes its share, then they are exchanged); with it, shards
        go to ``<cache_dir>/<split>/`` (each rank writes its share; rank 0 publishes it with one rename).
        """
        r, w = _dist() if rank is None else (rank, world)
        ids = {u for u, _ in utterances}
        final, tmp = (Path(cache_dir) / split, Path(cache_dir) / f".{split}.tmp") if cache_dir else (None, None)
        stale = None
        if final is not None and (final / INDEX_FILE).exists():
            stale = cls(folder=final)
            if stale.spec == spec and ids <= stale.ids():
                logger.info("feature cache %s: reusing %s", split, final)
                return stale
        estimate = estimate_cache([d for _, d in utterances], spec)
        check_budget(estimate, spec, split, cache_dir, max_ram_gb, max_disk_gb)
        logger.info("feature cache %s: %s", split, estimate.describe(spec))
        if cache_dir is None:
            feats = dict(compute_batched(encoder, rank_share(utterances, r, w), load, device,
                                         getattr(torch, spec.dtype), spec.pooled, batch_seconds))
            if w > 1:
                parts = [None] * w
                torch.distributed.all_gather_object(parts, feats)
                feats = {k: v for p in parts for k, v in p.items()}
            return cls(feats=feats)
        if stale is not None:
            _barrier()  # every rank has read the old index before rank 0 replaces it
            logger.warning("feature cache %s: '%s' holds %s for %d utterances, this run needs %s for %d: rebuilding",
                           split, final, stale.spec, len(stale), spec, len(ids))
        if r == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a killed build
            tmp.mkdir(parents=True)
        _barrier()
        build_rank(encoder, utterances, load, tmp, spec, r, w, device, batch_seconds, int(shard_mb * 2 ** 20))
        _barrier()
        if r == 0:
            finalize(tmp, final, spec, w, ids)
        _barrier()
        return cls(folder=final)


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


def backbone_identity(wavlm):
    """A string that changes when the cached features would: source, normalisation and λ."""
    lam = wavlm.coefficients() if getattr(wavlm, "num_vectors", 0) else {}
    lam = {k: [round(float(x), 8) for x in v] for k, v in lam.items()}
    return json.dumps({"source": str(getattr(wavlm, "source", "")), "normalize_wav": getattr(wavlm, "normalize_wav", None),
                       "lambda": lam}, sort_keys=True)


def spec_for(wavlm, dtype, pooled):
    return CacheSpec(num_hidden=wavlm.num_layers + 1, hidden_size=wavlm.hidden_size, dtype=dtype_name(dtype),
                     pooled=bool(pooled), backbone=backbone_identity(wavlm))
