"""Feature cache at scale (issue 13.2): size estimate + refusal, sharded streaming build, DDP rank sharding,
the pooled per-layer cache and its exactness for the ``pooled_linear`` head."""
import json

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
    on_disk = sum(p.stat().st_size for p in (tmp_path / "train").glob("*.safetensors"))
    assert data < on_disk <= est.bytes  # header allowance covers the safetensors headers
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
    large = fc.CacheSpec(25, 1024, "float32", False)  # the paper's train split on a default 500 GB budget
    with pytest.raises(fc.CacheBudgetError, match=r"2\.[0-9]+ TB for 89,752 utterances"):
        fc.check_budget(fc.estimate_cache([5.6] * 89752, large), large, "train", tmp_path, 16, 500)


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
