"""Feature cache at scale (issue 13.2): size estimate + refusal, sharded streaming build, DDP rank sharding,
the pooled per-layer cache and its exactness for the ``pooled_linear`` head."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lobes.adaltm import feature_cache as fc
from lobes.adaltm.merged_wavlm import MergedWavLM
from lobes.ser_head import SERHead
from lobes.weighted_sum import WeightedLayerSum
from tools.make_tiny_wavlm import make_tiny_wavlm

DURATIONS = [1.0, 0.55, 0.8, 1.3, 0.6, 0.95, 1.1, 0.7]  # seconds


@pytest.fixture(scope="module")
def wavlm(tmp_path_factory):
    torch.manual_seed(0)
    return MergedWavLM(make_tiny_wavlm(tmp_path_factory.mktemp("fc") / "wavlm"))


@pytest.fixture(scope="module")
def corpus():
    g = torch.Generator().manual_seed(3)
    wavs = {f"utt{i:02d}": torch.randn(round(d * 16000), generator=g) for i, d in enumerate(DURATIONS)}
    return [(u, w.numel() / 16000) for u, w in wavs.items()], wavs.__getitem__


def spec(wavlm, pooled=False, dtype=torch.float32):
    return fc.spec_for(wavlm, dtype, pooled)


def test_conv_frames_match_wavlm(wavlm):
    for n in (400, 401, 719, 720, 16000, 176000):
        assert fc.conv_frames(n) == int(wavlm.model._get_feat_extract_output_lengths(torch.tensor(n)))
    assert fc.conv_frames(16000) == 49 and fc.conv_frames(176000) == 549  # 50 frames/s (stride 320)


def test_estimate_exact_and_paper_scale(wavlm, corpus, tmp_path):
    utts, load = corpus
    s = spec(wavlm)
    est = fc.estimate_cache([d for _, d in utts], s)
    frames = sum(fc.conv_frames(round(d * 16000)) for _, d in utts)
    assert est.frames == frames and est.utterances == 8
    cache = fc.FeatureCache.build(wavlm, utts, load, s, "train", tmp_path, shard_mb=0.01)
    data = sum(cache[u].numel() * 4 for u, _ in utts)
    assert data == frames * 5 * 32 * 4 == est.bytes - fc.HEADER_BYTES_PER_ENTRY * 8  # data part is exact
    on_disk = sum(p.stat().st_size for p in (tmp_path / "train").iterdir())
    assert data < on_disk <= est.bytes  # the allowance covers the safetensors headers and index.json
    # the paper's subset (89,752 + 25,232 + 46,366 utterances, mean 5.6 s), WavLM-Large fp32: the 4.7 TB
    large = fc.CacheSpec(25, 1024, "float32", False)
    paper = fc.estimate_cache([5.6] * (89752 + 25232 + 46366), large)
    assert 4.5e12 < paper.bytes < 4.7e12
    pooled = fc.estimate_cache([5.6] * (89752 + 25232 + 46366), fc.CacheSpec(25, 1024, "float32", True))
    assert paper.bytes / pooled.bytes == pytest.approx(279, rel=0.01)  # 5.6 s = 279 frames


def test_over_budget_refuses_before_computing(wavlm, corpus, tmp_path):
    utts, _ = corpus

    def load(uid):
        raise AssertionError("nothing may be computed over budget")
    s = spec(wavlm)
    est = fc.estimate_cache([d for _, d in utts], s)
    with pytest.raises(fc.CacheBudgetError) as e:
        fc.FeatureCache.build(wavlm, utts, load, s, "train", tmp_path / "cache", max_disk_gb=est.bytes / 2e9)
    msg = str(e.value)
    assert fc.human_bytes(est.bytes) in msg and "feature_cache_max_disk_gb" in msg and "'train'" in msg
    assert not (tmp_path / "cache").exists()  # nothing half-written
    with pytest.raises(fc.CacheBudgetError, match="feature_cache_max_ram_gb: 1e-06"):
        fc.FeatureCache.build(wavlm, utts, load, s, "valid", None, max_ram_gb=1e-6)
    from lobes.adaltm.cache_plan import check_plans, plan_split

    # the paper's three splits in fp16 (issue 22: 2.30 TB passed a 1.5 TB budget, each split checked alone)
    half = fc.CacheSpec(25, 1024, "float16", False)
    plans = [plan_split(name, [(f"{name}{i}", 5.6) for i in range(n)], {f"{name}{i}" for i in range(n)}, half,
                        tmp_path / "paper") for name, n in (("train", 89752), ("valid", 25232), ("test", 46366))]
    assert [p.estimate.bytes for p in plans][0] < 1500e9  # the train split alone fits
    with pytest.raises(fc.CacheBudgetError) as e:
        check_plans(plans, half, tmp_path / "paper", 16, 1500)
    msg = str(e.value)
    assert "splits ['train', 'valid', 'test'] need 2.30 TB on disk together, over feature_cache_max_disk_gb: 1500" in msg
    assert "train: 1.28 TB for 89,752 utterances" in msg and "test: 662.34 GB for 46,366 utterances" in msg
    assert "feature_cache_pooled: True (with ser_head_type: pooled_linear): 8.30 GB (fits)" in msg
    # and the pooled fp32 cache of the three splits in RAM (issue 22: 16.5 GB passed the 16 GB limit)
    pooled = fc.CacheSpec(25, 1024, "float32", True)
    plans = [plan_split(p.split, p.utterances, p.keep, pooled, None) for p in plans]
    with pytest.raises(fc.CacheBudgetError, match=r"need 16\.56 GB in RAM together, over feature_cache_max_ram_gb: 16"):
        check_plans(plans, pooled, None, 16, 500)


def test_sharded_build_is_streamed_and_matches_per_utterance(wavlm, corpus, tmp_path):
    utts, load = corpus
    s = spec(wavlm)
    shard_mb = 0.02  # ~21 kB: each shard holds 1-2 utterances (one is 35-65 frames x 640 B)
    cache = fc.FeatureCache.build(wavlm, utts, load, s, "train", tmp_path, batch_seconds=2.5, shard_mb=shard_mb)
    shards = sorted((tmp_path / "train").glob("r0-*.safetensors"))
    assert len(shards) >= 4 and set(cache.index.values()) == {p.name for p in shards}
    # flushed as soon as a shard is full: no shard holds more than shard_bytes + one utterance
    biggest = max(cache[u].numel() * 4 for u, _ in utts)
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            assert sum(f.get_tensor(k).numel() * 4 for k in f.keys()) < shard_mb * 2 ** 20 + biggest  # noqa: SIM118 (safe_open is not iterable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # temp folder renamed away
    with torch.no_grad():
        for uid, _ in utts:  # batched on padded input == one utterance alone
            hidden, _ = wavlm(load(uid)[None], torch.ones(1))
            ref = hidden[:, 0].transpose(0, 1)
            assert cache[uid].shape == ref.shape == (fc.conv_frames(load(uid).numel()), 5, 32)
            torch.testing.assert_close(cache[uid], ref, atol=1e-5, rtol=1e-4)
    meta = json.loads((tmp_path / "train" / "index.json").read_text())
    assert meta["spec"]["num_hidden"] == 5 and len(meta["index"]) == 8


def test_ranks_union_equals_single_rank_build(wavlm, corpus, tmp_path):
    utts, load = corpus
    s = spec(wavlm)
    single = fc.FeatureCache.build(wavlm, utts, load, s, "one", tmp_path, rank=0, world=1)
    tmp = tmp_path / ".two.tmp"
    tmp.mkdir()
    parts = [fc.build_rank(wavlm, utts, load, tmp, s, rank=r, world=3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 2]  # r::world of the sorted ids
    assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
    with pytest.raises(Exception, match="rank 3 did not finish"):
        fc.finalize(tmp, tmp_path / "two", s, 4, [u for u, _ in utts])
    fc.finalize(tmp, tmp_path / "two", s, 3, [u for u, _ in utts])
    sharded = fc.FeatureCache(folder=tmp_path / "two")
    assert sharded.ids() == single.ids() == {u for u, _ in utts}
    for uid in single.ids():
        torch.testing.assert_close(sharded[uid], single[uid], atol=1e-5, rtol=1e-4)
    assert not tmp.exists()


def test_existing_cache_reused_or_rebuilt_on_change(wavlm, corpus, tmp_path):
    utts, load = corpus
    s = spec(wavlm)
    fc.FeatureCache.build(wavlm, utts, load, s, "train", tmp_path)
    stamp = (tmp_path / "train" / "index.json").stat().st_mtime_ns

    def no_load(uid):
        raise AssertionError("a valid cache is reused, not recomputed")
    fc.FeatureCache.build(wavlm, utts, no_load, s, "train", tmp_path)
    fc.FeatureCache.build(wavlm, utts, no_load, s, "train", tmp_path, max_disk_gb=1e-9)  # built: no budget check
    assert (tmp_path / "train" / "index.json").stat().st_mtime_ns == stamp
    half = fc.FeatureCache.build(wavlm, utts, load, spec(wavlm, dtype=torch.float16), "train", tmp_path)
    assert half.spec.dtype == "float16" and half[utts[0][0]].dtype == torch.float16


def test_pooled_cache_gives_frame_level_logits(wavlm, corpus, tmp_path):
    utts, load = corpus
    torch.manual_seed(1)
    ws = WeightedLayerSum(wavlm.num_layers, include_cnn=True)
    with torch.no_grad():
        ws.weights.normal_()
    head = SERHead(wavlm.hidden_size, 16, num_classes=8, head_type="pooled_linear").eval()
    fc.check_pooled_exact(ws, head)
    pooled = fc.FeatureCache.build(wavlm, utts, load, spec(wavlm, pooled=True), "train", tmp_path)
    frame = fc.FeatureCache.build(wavlm, utts, load, spec(wavlm), "train_frames", tmp_path)
    ids = [u for u, _ in utts]
    assert pooled[ids[0]].shape == (5, 32)
    p_bytes = sum(p.stat().st_size for p in (tmp_path / "train").glob("*.safetensors"))
    f_bytes = sum(p.stat().st_size for p in (tmp_path / "train_frames").glob("*.safetensors"))
    assert f_bytes / p_bytes > 20  # ~45 frames per utterance here, minus the headers
    with torch.no_grad():
        # frame level: the real padded-batch forward of the backbone
        from speechbrain.dataio.batch import PaddedBatch
        wavs = PaddedBatch([{"sig": load(u)} for u in ids]).sig
        hidden, mask = wavlm(*wavs)
        ref = head(ws(hidden), mask)
        # from the pooled cache, as train.py feeds it
        feats = PaddedBatch([{"feats": pooled[u]} for u in ids]).feats
        logits = head(ws(fc.cached_hidden(*feats)[0]), fc.cached_hidden(*feats)[1])
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
        # and from the frame-level cache
        ffeats = PaddedBatch([{"feats": frame[u]} for u in ids]).feats
        torch.testing.assert_close(head(ws(fc.cached_hidden(*ffeats)[0]), fc.cached_hidden(*ffeats)[1]), ref,
                                   atol=1e-5, rtol=0)
        # the paper's head (ReLU before pooling) is not exact from a pooled cache, and is refused
        mlp = SERHead(wavlm.hidden_size, 16, num_classes=8).eval()
        mlp.load_state_dict(head.state_dict())
        assert (mlp(ws(fc.cached_hidden(*feats)[0]), fc.cached_hidden(*feats)[1]) - mlp(ws(hidden), mask)
                ).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ser_head_type: pooled_linear"):
        fc.check_pooled_exact(ws, mlp)
    with pytest.raises(ValueError, match="layer_norm"):
        fc.check_pooled_exact(WeightedLayerSum(wavlm.num_layers, layer_norm=True), head)
    with pytest.raises(ValueError, match="pooling 'mean'"):
        SERHead(32, 16, pooling="mean_std", head_type="pooled_linear")


# ---------------------------------------------------------------------------------- issue 22.3: never stale
def make_datasets(splits, seed=5):
    """{split: DynamicItemDataset of synthetic utterances with ``duration`` and ``sig``}; splits: {name: [s]}."""
    from speechbrain.dataio.dataset import DynamicItemDataset
    from speechbrain.utils.data_pipeline import provides, takes

    g = torch.Generator().manual_seed(seed)
    wavs, out = {}, {}
    for split, durations in splits.items():
        data = {}
        for i, d in enumerate(durations):
            wavs[f"{split}{i:02d}"] = torch.randn(round(d * 16000), generator=g)
            data[f"{split}{i:02d}"] = {"duration": d}
        out[split] = DynamicItemDataset(data)

        @takes("id")
        @provides("sig")
        def sig(uid):
            return wavs[uid]
        out[split].add_dynamic_item(sig)
        out[split].set_output_keys(["id", "sig"])
    return out, wavs


def cache_hparams(wavlm, cache_dir, **changes):
    """The keys ``use_feature_cache`` reads, with the AdaLTM YAML's defaults."""
    h = {"wavlm": wavlm, "cache_features": True, "feature_cache_dir": cache_dir, "cache_dtype": torch.float32,
         "feature_cache_pooled": False, "feature_cache_max_ram_gb": 16, "feature_cache_max_disk_gb": 500,
         "feature_cache_over_budget": "error", "feature_cache_batch_seconds": 160, "feature_cache_shard_mb": 256,
         "task_vectors": {}, "weighted_sum": None, "ser_head": None, "sorting": "random", "dynamic_batching": False,
         "batch_size": 4, "micro_batch_size": None, "max_batch_length": 200, "micro_batch_length": None,
         "num_buckets": 40, "max_batch_ex": None, "num_workers": 0}
    h.update(changes)
    return h


def features(datasets):
    out = {}
    for ds in datasets.values():
        with ds.output_keys_as(["id", "feats"]):
            out.update({item["id"]: item["feats"] for item in ds})
    return out


SPLITS = {"train": [0.7, 0.5, 0.9], "valid": [0.6, 0.8], "test": [0.55, 0.65]}


@pytest.fixture(scope="module")
def vectors(wavlm, tmp_path_factory):
    """Two saved task vectors (ASR, SER) fitting the tiny WavLM, and its source folder."""
    from lobes.adaltm.task_vector import TaskVector, save_task_vector

    folder, g = tmp_path_factory.mktemp("tv"), torch.Generator().manual_seed(7)
    paths = {}
    for name in ("ASR", "SER"):
        delta = {k: 0.05 * torch.randn(wavlm.base_parameter(k).shape, generator=g) for k in wavlm.keys}
        paths[name] = str(save_task_vector(TaskVector(name, delta), folder / f"{name.lower()}.safetensors"))
    return paths, wavlm.source


def test_changed_task_vector_rebuilds_and_unchanged_is_reused(vectors, tmp_path, caplog):
    from lobes.adaltm.brain import use_feature_cache
    from lobes.adaltm.task_vector import load_task_vector, save_task_vector

    paths, source = vectors
    paths = {k: shutil.copy(p, tmp_path) for k, p in paths.items()}  # this test edits them

    def run(cache_dir, **changes):
        merged = MergedWavLM(source, paths, lambda_mode="fixed")
        ds, _ = make_datasets(SPLITS)
        return features(use_feature_cache(cache_hparams(merged, cache_dir, task_vectors=paths, **changes), ds))
    old = run(tmp_path / "cache")
    tv = load_task_vector(paths["ASR"])
    key = next(k for k in tv.delta if k.endswith("layers.0.feed_forward.intermediate_dense.weight"))
    tv.delta[key][0, 0] += 1.0  # one value of one task vector: same file size, same λ, same source
    save_task_vector(tv, paths["ASR"])
    with caplog.at_level("INFO", logger="lobes.adaltm.feature_cache"):
        cached = run(tmp_path / "cache")
    fresh = run(None)  # what this backbone computes, in RAM
    assert max((old[u] - fresh[u]).abs().max() for u in fresh) > 1e-3  # the change moves the features
    for uid in fresh:  # the rebuilt cache holds exactly the fresh features
        assert torch.equal(cached[uid], fresh[uid])
    stale = [r.getMessage() for r in caplog.records if "is stale" in r.getMessage()]
    assert len(stale) == 3 and f"feature cache {tmp_path / 'cache' / 'train'} is stale: task vector ASR changed; " \
        "rebuilding" in stale[0]
    caplog.clear()
    stamp = (tmp_path / "cache" / "train" / "index.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="lobes.adaltm.feature_cache"):
        again = run(tmp_path / "cache")  # nothing changed: reused, not recomputed
    assert (tmp_path / "cache" / "train" / "index.json").stat().st_mtime_ns == stamp
    assert sum("reusing" in r.getMessage() for r in caplog.records) == 3
    assert all(torch.equal(again[u], fresh[u]) for u in fresh)


def test_identity_hashes_files_once_and_names_each_change(vectors, tmp_path, monkeypatch):
    from lobes.adaltm import cache_identity as ci

    paths, source = vectors
    merged = MergedWavLM(source, paths, lambda_mode="fixed")
    reads = []
    real = ci.hashlib.file_digest
    monkeypatch.setattr(ci.hashlib, "file_digest", lambda f, name: reads.append(f.name) or real(f, name))
    memo = {}
    first = ci.cache_identity(merged, paths, memo=memo)
    n_files = len(first["base"]) + 2
    assert len(reads) == n_files and set(first["task_vectors"]) == {"ASR", "SER"}
    assert first["task_vectors"]["SER"] == hashlib.sha256(Path(paths["SER"]).read_bytes()).hexdigest()
    assert ci.cache_identity(merged, paths, memo=memo) == first and len(reads) == n_files  # memoised
    st = os.stat(paths["SER"])
    os.utime(paths["SER"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again, same content
    assert ci.cache_identity(merged, paths, memo=memo) == first and len(reads) == n_files + 1
    # in-memory vectors (no path) are hashed from the tensors the model holds, and agree with themselves only
    assert ci.cache_identity(merged)["task_vectors"] == ci.cache_identity(merged)["task_vectors"]
    other = MergedWavLM(source, paths, lambda_mode="fixed", lambda_init=0.25, delta_dtype=torch.bfloat16)
    changes = ci.describe_change(first, ci.cache_identity(other, paths, memo=memo))
    assert changes == ["λ changed", "merge delta_dtype changed"]
    truncated = MergedWavLM(source, paths, lambda_mode="fixed", delta_rank=2)  # low-rank ΔW: other features
    assert ci.describe_change(first, ci.cache_identity(truncated, paths, memo=memo)) == ["merge delta_rank changed"]
    assert ci.describe_change(first, ci.cache_identity(MergedWavLM(source), memo=memo)) == [
        "task vector removed", "λ removed", "merge removed"]


def test_all_splits_checked_together_before_anything_is_built(wavlm, tmp_path, monkeypatch):
    from lobes.adaltm.brain import use_feature_cache

    ds, _ = make_datasets(SPLITS)
    spec = fc.spec_for(wavlm, torch.float32, False)
    sizes = {s: fc.estimate_cache(d, spec).bytes for s, d in SPLITS.items()}
    budget = (max(sizes.values()) + sum(sizes.values())) / 2  # every split fits alone, not all three
    for split in ds:  # nothing may be computed
        ds[split].add_dynamic_item(lambda uid: (_ for _ in ()).throw(AssertionError("computed")), takes="id",
                                   provides="sig")
    with pytest.raises(fc.CacheBudgetError) as e:
        use_feature_cache(cache_hparams(wavlm, tmp_path / "cache", feature_cache_max_disk_gb=budget / 1e9), ds)
    msg = str(e.value)
    assert not (tmp_path / "cache").exists()  # no file written, not even the hash memo
    assert f"splits ['train', 'valid', 'test'] need {fc.human_bytes(sum(sizes.values()))} on disk together" in msg
    assert f"over feature_cache_max_disk_gb: {budget / 1e9} ({fc.human_bytes(budget)})" in msg
    assert all(f"  {s}: {fc.human_bytes(b)} for {len(SPLITS[s])} utterances" in msg for s, b in sizes.items())
    assert "cache_dtype: !name:torch.float16: " in msg and "(fits)" in msg
    with pytest.raises(fc.CacheBudgetError, match="need .* in RAM together, over feature_cache_max_ram_gb"):
        use_feature_cache(cache_hparams(wavlm, None, feature_cache_max_ram_gb=budget / 1e9), ds)
    # recompute instead: the datasets come back untouched
    out = use_feature_cache(cache_hparams(wavlm, None, feature_cache_max_ram_gb=budget / 1e9,
                                          feature_cache_over_budget="recompute"), ds)
    assert out is ds and ds["train"].pipeline.output_mapping == {"id": "id", "sig": "sig"}


def test_leftovers_removed_before_the_free_space_check(wavlm, corpus, tmp_path, monkeypatch):
    utts, load = corpus
    debris = tmp_path / "cache" / ".train.tmp"
    debris.mkdir(parents=True)
    (debris / "r0-00000.safetensors").write_bytes(b"\0" * 1000)
    real = shutil.disk_usage
    seen = []

    def disk_usage(path):
        seen.append(debris.exists())
        return real(path)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    fc.FeatureCache.build(wavlm, utts, load, spec(wavlm), "train", tmp_path / "cache")
    assert seen == [False]  # measured once, after the killed build's folder was gone


RANDOM_SPLITS = {"train": [0.7, 0.5, 0.9, 0.6], "valid": [0.6, 0.8], "test": [0.55, 0.65]}


def _held(ds, result):
    """{id: feats} this process can read from its in-RAM caches; the DataError of any other id into ``result``."""
    held = {}
    for d in ds.values():
        for i, uid in enumerate(d.data_ids):
            try:
                with d.output_keys_as(["feats"]):
                    held[uid] = d[i]["feats"].contiguous()
            except Exception as e:  # the DataError of an utterance this rank does not hold
                result.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
    return held


def _train_epochs(train, hparams, rank, held, epochs=3):
    """Ids of each epoch's batches on this rank, dealt as SpeechBrain's Brain deals a shuffled training set under
    DDP (its own ``_train_loader_specifics``: a DistributedSampler reshuffled per epoch), and how many batch items
    differ from this rank's cache."""
    from types import SimpleNamespace

    import speechbrain as sb

    from lobes.dataio import loader_kwargs

    brain = SimpleNamespace(distributed_launch=True, rank=rank, hparams=SimpleNamespace(sorting="random"))
    kwargs = sb.Brain._train_loader_specifics(brain, train, loader_kwargs(hparams, train, train=True))
    loader = sb.dataio.dataloader.make_dataloader(train, **kwargs)
    out, wrong = [], 0
    for epoch in range(epochs):
        kwargs["sampler"].set_epoch(epoch)
        ids = []
        with train.output_keys_as(["id", "feats"]):
            for batch in loader:
                ids += batch.id
                for i, uid in enumerate(batch.id):
                    wrong += not torch.equal(batch.feats.data[i, : held[uid].shape[0]], held[uid])
        out.append(ids)
    return out, wrong


def _ddp_worker(rank, world, port, out, source):
    """One rank: the in-RAM caches under DDP, shuffled (RANDOM_SPLITS) then sorted (SPLITS); writes the features it
    can read and the ids of its training batches."""
    from safetensors.torch import save_file

    from lobes import distributed as D
    from lobes.adaltm.brain import use_feature_cache

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        wavlm, result, shuffled = MergedWavLM(source), {}, {}
        # shuffled training set: every rank holds all of it (one utterance per build batch: same shapes as the
        # single-process reference, so the features may be compared to 1e-6)
        h = cache_hparams(wavlm, None, batch_size=2, feature_cache_batch_seconds=0.1)
        ds = use_feature_cache(h, make_datasets(RANDOM_SPLITS)[0])
        held = _held(ds, shuffled)
        shuffled["epochs"], shuffled["wrong"] = _train_epochs(ds["train"], h, rank, held)
        save_file(held, str(Path(out) / f"rank{rank}_random.safetensors"))
        Path(out, f"rank{rank}_random.json").write_text(json.dumps(shuffled))
        ds = use_feature_cache(cache_hparams(wavlm, None, batch_size=2, sorting="ascending"), make_datasets(SPLITS)[0])
        save_file(_held(ds, result), str(Path(out) / f"rank{rank}.safetensors"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        _gather_checks(rank, world, out)
        torch.distributed.barrier()
    finally:
        D.release_process_group()


def test_ddp_ram_cache_holds_only_each_ranks_share(wavlm, tmp_path):
    """2 gloo processes: each rank computes and keeps only the utterances its loaders read (valid / test: batches
    r, r+W, ...; train unshuffled: DistributedSampler's strided share, padded). A shuffled training set is held
    whole by every rank (built half per rank and all-gathered): same features on both ranks, equal to one
    process's to 1e-6, and every epoch's batches over both ranks read each training utterance once. Also
    :func:`_assert_gather_checks` (gather_entries' rounds and dtypes, ranks listing different utterances)."""
    import socket

    from safetensors.torch import load_file

    from lobes import distributed as D
    from lobes.adaltm.brain import use_feature_cache

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path), wavlm.source), nprocs=2, join=True)
    _assert_gather_checks(tmp_path)  # one spawn for both (a spawn's imports cost ~20 s on 2 cores)
    single = features(use_feature_cache(cache_hparams(wavlm, None, feature_cache_batch_seconds=0.1),
                                        make_datasets(RANDOM_SPLITS)[0]))
    train = [f"train{i:02d}" for i in range(4)]
    held = [load_file(str(tmp_path / f"rank{r}_random.safetensors")) for r in range(2)]
    info = [json.loads((tmp_path / f"rank{r}_random.json").read_text()) for r in range(2)]
    for r in range(2):
        assert set(held[r]) == {*train, f"valid{r:02d}", f"test{r:02d}"}  # all of train, its share of valid / test
        assert len(info[r]["errors"]) == 2 and info[r]["wrong"] == 0
        for uid, t in held[r].items():
            torch.testing.assert_close(t, single[uid], atol=1e-6, rtol=0)
    assert all(torch.equal(held[0][u], held[1][u]) for u in train)
    for epoch, (ids0, ids1) in enumerate(zip(info[0]["epochs"], info[1]["epochs"])):
        assert len(ids0) == len(ids1) == 2
        D.check_ids(ids0 + ids1, train, f"epoch {epoch}'s training batches of both ranks")  # DataError otherwise
    assert len({tuple(sorted(e)) for e in info[0]["epochs"]}) > 1  # rank 0 reads other utterances in other epochs
    # sorted training set: batch_size 2 over 2 GPUs = micro 1: valid/test batches [0], [1]; train (3, ascending):
    # indices 0,1,2 + pad 0
    single = features(use_feature_cache(cache_hparams(wavlm, None), make_datasets(SPLITS)[0]))
    expected = [{"train00", "train02", "valid00", "test00"}, {"train01", "train00", "valid01", "test01"}]
    for r in range(2):
        held = load_file(str(tmp_path / f"rank{r}.safetensors"))
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert set(held) == expected[r]
        assert len(info["errors"]) == len(single) - len(expected[r])
        assert "is not in this process's in-RAM feature cache" in info["errors"][0]
        for uid, t in held.items():  # same features as one process computes (other batch composition)
            torch.testing.assert_close(t, single[uid], atol=1e-5, rtol=1e-4)


def test_ram_shards_replicate_a_training_set_dealt_anew_each_epoch(monkeypatch):
    from torch.utils.data import DistributedSampler

    from lobes.adaltm.cache_plan import ram_shards, replicated_splits

    # why: SpeechBrain's DDP train sampler with sorting: random reshuffles per epoch (seed + epoch), so rank 0's
    # utterances of epoch 1 are not those of epoch 0
    sampler = DistributedSampler(range(64), num_replicas=2, rank=0, shuffle=True)
    sampler.set_epoch(0)
    first = set(sampler)
    sampler.set_epoch(1)
    assert len(first) == 32 and set(sampler) != first
    ds, _ = make_datasets(SPLITS)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: the loaders' micro-batch is batch_size / 2
    for changes in ({"sorting": "random"}, {"sorting": "ascending", "dynamic_batching": True}):
        shards = ram_shards(cache_hparams(None, None, batch_size=2, **changes), ds, 2)
        assert shards[0]["train"] == shards[1]["train"] == {"train00", "train01", "train02"}
        assert replicated_splits(shards) == ["train"]  # valid / test keep their per-rank shards
        assert not shards[0]["valid"] & shards[1]["valid"] and shards[0]["valid"] | shards[1]["valid"] == {
            "valid00", "valid01"}
    # on a GPU auto becomes the plan's micro-batch, and the evaluation shards follow it: plan first, then shard
    with pytest.raises(RuntimeError, match="must be planned .* before an in-RAM feature cache is sharded"):
        ram_shards(cache_hparams(None, None, sorting="ascending", batch_size=2, micro_batch_size="auto"), ds, 2)
    shards = ram_shards(cache_hparams(None, None, sorting="ascending", batch_size=2), ds, 2)
    assert shards[1] == {"train": {"train01", "train00"}, "valid": {"valid01"}, "test": {"test01"}}


def test_replicated_train_split_budget_per_host_at_paper_scale():
    """The paper's machine (2 GPUs, one host), pooled fp32 WavLM-Large cache, shuffled training set: each rank holds
    all 89,752 training utterances plus half of valid / test, and ``feature_cache_max_ram_gb`` is per host."""
    from lobes.adaltm.cache_plan import check_plans, plan_split

    pooled = fc.CacheSpec(25, 1024, "float32", True)
    sizes = {"train": 89752, "valid": 25232, "test": 46366}
    utts = {s: [(f"{s}{i}", 5.6) for i in range(n)] for s, n in sizes.items()}
    shards = [{s: {u for u, _ in utts[s]} if s == "train" else {u for u, _ in utts[s][r::2]} for s in sizes}
              for r in range(2)]
    plans = [plan_split(s, utts[s], shards[0][s], pooled, None) for s in sizes]
    per_utt = 25 * 1024 * 4 + fc.HEADER_BYTES_PER_ENTRY
    rank = per_utt * (89752 + 25232 // 2 + 46366 // 2)
    assert rank == 12_888_563_456  # 9.21 GB of train + 3.67 GB of valid / test, per rank
    with pytest.raises(fc.CacheBudgetError) as e:
        check_plans(plans, pooled, None, 16, 500, shards, per_host=2)
    msg = str(e.value)
    assert "need 25.78 GB per host (2 DDP ranks of 2 on it: 12.89 GB + 12.89 GB) together, over " \
           "feature_cache_max_ram_gb: 16 (16.00 GB)" in msg
    assert "['train'] is dealt to the ranks anew every epoch" in msg and "feature_cache_max_ram_gb (per host) to 26" in msg
    assert "cache_dtype: !name:torch.float16: 12.92 GB (fits)" in msg
    check_plans(plans, pooled, None, 26, 500, shards, per_host=2)  # what the message asks for fits
    check_plans(plans, pooled, None, 16, 500, shards, per_host=1)  # one GPU per host: 12.89 GB each


def _gather_entries_expected():
    """{uid: tensor} over both ranks: variable lengths, bf16 and fp32, one entry larger than a round; rank 0 holds 5
    entries (several rounds), rank 1 two (one round), so rank 1 sends empty buffers in the later rounds."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for r, lengths in ((0, (7, 1, 40, 3, 12)), (1, (5, 9))):
        for i, n in enumerate(lengths):
            dtype = torch.bfloat16 if (r + i) % 2 else torch.float32
            out[f"r{r}_{i}"] = torch.randn(n, 3, 4, generator=g).to(dtype)
    return out


class _FrameEncoder(torch.nn.Module):
    """Stands in for WavLM in compute_batched: hidden [2, B, T, 3] from the samples, all frames valid."""

    def forward(self, wavs, lens):
        hidden = wavs[None, :, :, None].expand(2, -1, -1, 3)
        return hidden, torch.ones(wavs.shape, dtype=torch.bool)


def _gather_checks(rank, world, out):
    """In a rank of :func:`_ddp_worker`: :func:`fc.gather_entries` of :func:`_gather_entries_expected`, and
    ``ram_entries`` for ranks that list different utterances; results written for :func:`_assert_gather_checks`."""
    from types import SimpleNamespace

    from lobes.adaltm.cache_plan import SplitPlan

    local = {u: t for u, t in _gather_entries_expected().items() if u.startswith(f"r{rank}_")}
    got = fc.gather_entries(local, round_bytes=200)  # 40 x 3 x 4 x 4 B = 1920 B: an entry over a round
    assert local == {}  # sent entries are dropped from the caller's dict
    torch.save(got, Path(out) / f"gather{rank}.pt")
    plan = SplitPlan("train", [(f"u{i}", 0.01) for i in range(4 - rank)], {f"u{i}" for i in range(4)}, "build")
    try:
        got = fc.ram_entries(_FrameEncoder(), plan, lambda uid: torch.ones(160), SimpleNamespace(
            dtype="float32", pooled=False), "cpu", 1.0, (rank, world))
        msg = f"no error, held {sorted(got)}"
    except Exception as e:  # noqa: BLE001 (the message is compared in the test)
        msg = f"{type(e).__name__}: {e}"
    Path(out, f"ids{rank}.txt").write_text(msg)


def _assert_gather_checks(out):
    """gather_entries over 2 gloo ranks: every entry, bitwise with its dtype and shape, on both ranks, across rounds
    of unequal count per rank; and ram_entries refuses on every rank when the ranks list different utterances (old
    code computed the r::2 shares of different lists: 'u3' computed by no rank, found only when a batch needs it)."""
    want = _gather_entries_expected()
    for r in range(2):
        got = torch.load(out / f"gather{r}.pt", weights_only=True)
        assert sorted(got) == sorted(want)
        for uid, t in want.items():
            assert got[uid].dtype == t.dtype and got[uid].shape == t.shape and torch.equal(got[uid], t), uid
        msg = (out / f"ids{r}.txt").read_text()
        assert msg.startswith("DataError: in-RAM feature cache of 'train': the DDP ranks list different utterances "
                              "(count, digest per rank: [(4, "), msg


def test_a_second_run_on_one_cache_folder_is_refused_before_it_touches_it(wavlm, corpus, tmp_path):
    """Two runs side by side (run.sh --nj) on one feature_cache_dir: the second is refused, naming the folder,
    before it removes the first one's temp shards; once the first process is gone (killed: the kernel drops its
    flock) the folder is usable again."""
    import subprocess
    import sys

    from lobes.errors import DataError

    utts, load = corpus
    cache = tmp_path / "cache"
    in_progress = cache / ".train.tmp"  # the first run's build
    in_progress.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lobes.io_utils import hold_lock\n"
         "hold_lock(sys.argv[1], 'cache')\nprint('held', flush=True)\ntime.sleep(120)", str(tmp_path / ".cache.lock.rank0")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DataError, match=f"feature_cache_dir '{cache}' is in use by another running process"):
            fc.FeatureCache.build(wavlm, utts, load, spec(wavlm), "train", cache)
        assert in_progress.exists()
    finally:
        holder.kill()
        holder.wait()
    built = fc.FeatureCache.build(wavlm, utts, load, spec(wavlm), "train", cache)
    assert not in_progress.exists() and len(built) == len(utts)
