"""Feature caching for static backbones (issue 8, target 2): a 100-epoch Setup-1 run with vs without the cache.

    .venv/bin/python benchmarks/bench_feature_cache.py [--epochs 100] [--uncached-epochs 1] [--out ...]
    .venv/bin/python benchmarks/bench_feature_cache.py --scale [--out logs/feature_cache_scale.json]

    .venv/bin/python benchmarks/bench_feature_cache.py --identity [--mb 1262] [--out logs/feature_cache_identity.json]

``--identity`` (issue 22.3) measures what keeping a cache fresh costs per run: hashing a file of WavLM-Large's size
(1262 MB of safetensors) once, the memoised look-up that replaces it while the file's size and mtime are unchanged,
and planning + checking the paper's three splits together (161,350 utterances) before anything is built.

``--scale`` (issue 13.2) measures, without train.py, (1) the peak resident memory of a cache build at 1x and
4x corpus size, streamed to disk in shards vs held in memory, each in a fresh child process; (2) the pooled
cache: its size and the time of one α + head training epoch from it vs from the frame-level cache vs
recomputing the backbone, on a WavLM-Base-shaped model (see ``scale_main``).

The real recipe (``recipes/MSP-Podcast/adaltm/train.py``, row ``setup1_frozen``: frozen WavLM, α + head
trained) on the generated mini MSP-Podcast corpus (``data/mini``, generated when missing), with a
WavLM-Base-shaped random-init backbone (``_common.base_config``), 2 threads, batch 16, same seed everywhere:

  uncached  ``cache_features=False`` for ``--uncached-epochs`` epochs (the backbone runs on every batch).
            Every epoch costs the same, so its ``--epochs`` wall time is estimated as the measured run plus
            (epochs - uncached_epochs) x the last epoch's train + valid seconds (``time_s`` in train_log.txt;
            the per-epoch checkpoint save is left out, which only lowers the estimate, i.e. the ratio is
            conservative).
  cached    ``cache_features=True`` for all ``--epochs`` epochs, measured end to end (startup, building the
            cache for train/valid/test, training, test).
  check     the same recipe with the tiny WavLM (``data/tiny_wavlm``, made when missing) for ``--check-epochs``
            epochs, uncached and cached, same seed: metrics.json and the learned α are compared (the cache
            computes each utterance alone, the uncached path in padded batches, so hidden states may differ
            in the last float bits; the metrics must be the same).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "MSP-Podcast" / "adaltm"


def train(out, model_dir, data, epochs, cache, log):
    cmd = [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "rows" / "setup1_frozen.yaml"),
           f"--data_folder={data}", f"--wavlm_source={model_dir}", f"--output_folder={out}",
           f"--number_of_epochs={epochs}", f"--cache_features={cache}", "--batch_size=16", "--lr=0.01",
           "--head_hidden=64", "--num_bootstraps=200", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(C.THREADS), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc:
        sys.exit(f"train.py failed (rc {rc}), see {log}:\n" + Path(log).read_text()[-3000:])
    return wall


def epoch_seconds(train_log):
    """[(train time_s, valid time_s)] per epoch from a train_log.txt."""
    out = []
    for line in Path(train_log).read_text().splitlines():
        t = re.findall(r"time_s: ([0-9.e+-]+)", line)
        if line.startswith("epoch:") and len(t) == 2:
            out.append((float(t[0]), float(t[1])))
    return out


def learned(out):
    """metrics.json plus the learned α of the best checkpoint (what a cached run must reproduce)."""
    import torch

    metrics = json.loads((Path(out) / "metrics.json").read_text())
    ckpt = sorted((Path(out) / "save").glob("CKPT+*"))[-1]
    alpha = torch.load(ckpt / "weighted_sum.ckpt", map_location="cpu", weights_only=True)
    return metrics, {k: v.tolist() for k, v in alpha.items()}


def max_diff(a, b):
    """Largest absolute difference between two nested JSON-like values of the same structure."""
    if isinstance(a, dict):
        return max([max_diff(a[k], b[k]) for k in a if k in b] or [0.0])
    if isinstance(a, list):
        return max([max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def compare(tmp):
    (m_u, alpha_u), (m_c, alpha_c) = learned(tmp / "check_uncached"), learned(tmp / "check_cached")
    test_u, test_c = m_u["test"], m_c["test"]
    same = {k: test_u[k] == test_c[k] for k in ("uar", "macro_precision", "macro_f1", "accuracy") if k in test_u}
    return {"metrics_identical": same, "test_loss": [m_u["test_loss"], m_c["test_loss"]],
            "max_abs_diff_metrics": max_diff(test_u, test_c), "max_abs_diff_alpha": max_diff(alpha_u, alpha_c)}


def check_only(a, tmp, walls):
    res = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    check = compare(tmp)
    res.update(check)
    res["check"] = {"machine": C.machine_info(), "command": " ".join(sys.argv), "walls_s": walls, **check}
    print(f"identical metrics (tiny WavLM, uncached vs cached, {a.check_epochs} epochs, same seed): "
          f"{check['metrics_identical']}; max |Δ| metrics {check['max_abs_diff_metrics']:.2e}, "
          f"α {check['max_abs_diff_alpha']:.2e}, test loss {check['test_loss']}")
    C.save_json(a.out, res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--uncached-epochs", type=int, default=1)
    p.add_argument("--check-epochs", type=int, default=3)
    p.add_argument("--data", default=str(ROOT / "data" / "mini" / "MSP-Podcast"))
    p.add_argument("--model-dir", help="existing WavLM dir (default: a random-init WavLM-Base in a temp dir)")
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "feature_cache.json"))
    p.add_argument("--check-only", action="store_true",
                   help="only the tiny-WavLM identical-metrics check; its fields replace those in --out")
    a = p.parse_args(argv)
    if not (Path(a.data) / "Labels").is_dir():
        subprocess.run([sys.executable, "-m", "tools.make_mini_corpora", "--msp_out", a.data], cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_feature_cache_"))
    try:
        model_dir = a.model_dir or C.make_model_dir(tmp / "wavlm_base")
        t_start = time.time()
        tiny = ROOT / "data" / "tiny_wavlm"
        if not (tiny / "config.json").exists():
            subprocess.run([sys.executable, "-m", "tools.make_tiny_wavlm", "--out", str(tiny)], cwd=ROOT, check=True)
        runs = {"uncached": (model_dir, a.uncached_epochs, False), "cached": (model_dir, a.epochs, True),
                "check_uncached": (tiny, a.check_epochs, False), "check_cached": (tiny, a.check_epochs, True)}
        if a.check_only:
            runs = {k: v for k, v in runs.items() if k.startswith("check")}
        walls = {}
        for name, (wavlm, epochs, cache) in runs.items():
            walls[name] = train(tmp / name, wavlm, a.data, epochs, cache, tmp / f"{name}.log")
            print(f"  {name:15s} {epochs:3d} epochs cache={cache}: {walls[name]:7.1f} s", flush=True)
        if a.check_only:
            return check_only(a, tmp, walls)
        per_epoch = {n: epoch_seconds(tmp / n / "train_log.txt") for n in runs}
        last = per_epoch["uncached"][-1]
        est_uncached = walls["uncached"] + (a.epochs - a.uncached_epochs) * sum(last)
        ratio = est_uncached / walls["cached"]
        check = compare(tmp)
        res = {"machine": C.machine_info(), "command": " ".join(sys.argv), "epochs": a.epochs,
               "uncached_epochs": a.uncached_epochs, "check_epochs": a.check_epochs,
               "backbone": "WavLM-Base-shaped random init (94.4M); check: tiny WavLM",
               "walls_s": walls, "per_epoch_s": per_epoch, "uncached_epoch_s": sum(last),
               "cached_epoch_s_median": C.median([sum(e) for e in per_epoch["cached"]]),
               "estimated_uncached_total_s": est_uncached, "speedup": ratio,
               **check, "wall_s": time.time() - t_start}
        print(f"\nuncached: {sum(last):.1f} s/epoch (train {last[0]:.1f} + valid {last[1]:.1f}) -> "
              f"{a.epochs} epochs ≈ {est_uncached:.0f} s")
        print(f"cached:   {a.epochs} epochs measured {walls['cached']:.0f} s "
              f"({res['cached_epoch_s_median']:.2f} s/epoch after the cache is built)")
        print(f"speed-up {ratio:.1f}x; metrics identical (tiny WavLM, uncached vs cached, {a.check_epochs} epochs, same seed): "
              f"{check['metrics_identical']}; max |Δ| metrics {res['max_abs_diff_metrics']:.2e}, "
              f"α {res['max_abs_diff_alpha']:.2e}, test loss {check['test_loss']}")
        C.save_json(a.out, res)
        print(f"written {a.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ --scale (13.2)
def synthetic_corpus(n, seed=0):
    """n utterances of 2.75-11 s (MSP-Podcast's range), waveforms made on demand (the corpus is never in RAM)."""
    import random

    import torch

    rng = random.Random(seed)
    utts = [(f"utt{i:05d}", round(rng.uniform(2.75, 11.0), 3)) for i in range(n)]
    durations = dict(utts)

    def load(uid):
        g = torch.Generator().manual_seed(int(uid[3:]))
        return torch.randn(round(durations[uid] * 16000), generator=g)
    return utts, load


def child_build(model_dir, n, where, out_dir):
    """Peak RSS above the loaded model of one cache build (child process)."""
    import torch

    from lobes.adaltm import feature_cache as fc
    from lobes.adaltm.merged_wavlm import MergedWavLM

    C.set_threads()
    # oneDNN (CPU convolutions) caches a compiled kernel per distinct input shape, ~0.4 MiB each for this model,
    # up to 1024 (ONEDNN_PRIMITIVE_CACHE_CAPACITY): resident memory then grows with the number of distinct batch
    # shapes, which is code, not cached features. Measured without it, so that only the cache's memory shows.
    torch.backends.mkldnn.enabled = False
    wavlm = MergedWavLM(model_dir)
    utts, load = synthetic_corpus(n)
    spec = fc.spec_for(wavlm, torch.float32, False)
    with torch.no_grad():  # warm-up: first-call kernel / thread-pool set-up is not the cache's memory
        wavlm(load(utts[0][0])[None], torch.ones(1))
    rss0 = C.rss_bytes()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    cache = fc.FeatureCache.build(wavlm, utts, load, spec, "train", None if where == "memory" else out_dir,
                                  batch_seconds=60, shard_mb=8, max_ram_gb=100, max_disk_gb=100)
    wall = time.perf_counter() - t0
    est = fc.estimate_cache([d for _, d in utts], spec)
    C.emit({"n": n, "where": where, "peak_above_model": C.peak_rss_bytes() - rss0, "wall_s": wall,
            "cache_bytes": est.bytes, "audio_s": est.audio_seconds, "entries": len(cache)})


def epoch_times(wavlm, utts, load, caches, epochs=2, batch=16):
    """Seconds of one α + head training epoch per source: 'recompute' (backbone forward per batch) or a cache."""
    import torch
    from speechbrain.dataio.batch import PaddedBatch

    from lobes.adaltm import feature_cache as fc
    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    out = {}
    for source in ["recompute"] + list(caches):
        torch.manual_seed(0)
        ws, head = WeightedLayerSum(wavlm.num_layers), SERHead(wavlm.hidden_size, 256, head_type="pooled_linear")
        opt = torch.optim.AdamW(list(ws.parameters()) + list(head.parameters()), lr=1e-4)
        ids = [u for u, _ in utts]
        times = []
        for _ in range(1 if source == "recompute" else epochs):
            t0 = time.perf_counter()
            for i in range(0, len(ids), batch):
                chunk = ids[i:i + batch]
                if source == "recompute":
                    wavs, lens = PaddedBatch([{"sig": load(u)} for u in chunk]).sig
                    hidden, mask = wavlm(wavs, lens)
                else:
                    hidden, mask = fc.cached_hidden(*PaddedBatch([{"feats": caches[source][u].float()}
                                                                  for u in chunk]).feats)
                loss = head(ws(hidden), mask).logsumexp(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            times.append(time.perf_counter() - t0)
        out[source] = min(times)
    return out


def scale_main(a):
    """Streaming peak RSS (1x / 4x, disk vs memory) and the pooled cache's size and epoch-time ratios."""
    import torch

    from lobes.adaltm import feature_cache as fc
    from lobes.adaltm.merged_wavlm import MergedWavLM
    from tools.make_tiny_wavlm import make_tiny_wavlm

    res = {"machine": C.machine_info(), "command": " ".join(sys.argv)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_fc_scale_"))
    try:
        tiny = make_tiny_wavlm(tmp / "tiny", num_layers=4, hidden_size=64)
        rows = []
        for n in (a.scale_n, 4 * a.scale_n) if a.scale_n else ():
            for where in ("disk", "memory"):
                r = C.run_child(__file__, ["--child-build", tiny, n, where, tmp / f"cache_{n}_{where}"], timeout=3000)
                rows.append(r)
                print(f"  {n:5d} utterances ({r['audio_s'] / 3600:.2f} h, cache {r['cache_bytes'] / 2**20:7.1f} MiB) "
                      f"{where:6s}: peak RSS above the model {r['peak_above_model'] / 2**20:7.1f} MiB "
                      f"({r['wall_s']:.0f} s)", flush=True)
        res["streaming"] = {"model": "tiny WavLM, 4 layers x 64 (5 hidden states x 64 fp32 = 1280 B/frame)",
                            "shard_mb": 8, "batch_seconds": 60, "rows": rows}
        if not a.pooled_n:
            C.save_json(a.out, res)
            return
        # pooled vs frame vs recompute on a WavLM-Base-shaped backbone
        base = C.make_model_dir(tmp / "base")
        torch.set_num_threads(C.THREADS)
        wavlm = MergedWavLM(base)
        utts, load = synthetic_corpus(a.pooled_n, seed=1)
        caches, sizes, builds = {}, {}, {}
        for name, pooled in (("frame", False), ("pooled", True)):
            spec = fc.spec_for(wavlm, torch.float32, pooled)
            t0 = time.perf_counter()
            caches[name] = fc.FeatureCache.build(wavlm, utts, load, spec, name, tmp / "caches", batch_seconds=60,
                                                 max_ram_gb=100, max_disk_gb=100)
            builds[name] = time.perf_counter() - t0
            sizes[name] = sum(p.stat().st_size for p in (tmp / "caches" / name).iterdir())
        epochs = epoch_times(wavlm, utts, load, caches)
        paper = [5.6] * 89752  # the paper's train split, mean 5.6 s, WavLM-Large fp32
        large = {k: fc.estimate_cache(paper, fc.CacheSpec(25, 1024, "float32", k == "pooled")).bytes
                 for k in ("frame", "pooled")}
        res["pooled"] = {"backbone": "WavLM-Base-shaped random init (13 hidden states x 768)", "utterances": len(utts),
                         "audio_s": sum(d for _, d in utts), "bytes_on_disk": sizes, "build_s": builds,
                         "epoch_s": epochs, "size_ratio_frame_over_pooled": sizes["frame"] / sizes["pooled"],
                         "epoch_ratio_recompute_over_pooled": epochs["recompute"] / epochs["pooled"],
                         "epoch_ratio_frame_over_pooled": epochs["frame"] / epochs["pooled"],
                         "epoch_ratio_recompute_over_frame": epochs["recompute"] / epochs["frame"],
                         "paper_train_split_bytes": large}
        print(f"  pooled cache: {sizes['pooled'] / 2**20:.2f} MiB vs frame {sizes['frame'] / 2**20:.1f} MiB "
              f"({sizes['frame'] / sizes['pooled']:.0f}x smaller); epoch: recompute {epochs['recompute']:.2f} s, "
              f"frame {epochs['frame']:.3f} s, pooled {epochs['pooled']:.4f} s")
        C.save_json(a.out, res)
        print(f"written {a.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ --identity (22.3)
def identity_main(a):
    """Seconds of a first hash, of a memoised one, and of planning the paper's splits together."""
    from lobes.adaltm import cache_identity as ci
    from lobes.adaltm.cache_plan import CacheBudgetError, CacheSpec, check_plans, plan_split

    tmp = Path(tempfile.mkdtemp(prefix="bench_fc_identity_"))
    try:
        big = tmp / "model.safetensors"
        with open(big, "wb") as f:  # random bytes (not compressible), written in 16 MiB pieces
            for _ in range(a.mb // 16):
                f.write(os.urandom(16 * 2 ** 20))
        memo = {}
        t0 = time.perf_counter()
        ci.file_sha256(big, memo)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(100):
            ci.file_sha256(big, memo)
        memoised = (time.perf_counter() - t0) / 100
        spec = CacheSpec(25, 1024, "float16", False)
        t0 = time.perf_counter()
        plans = [plan_split(name, [(f"{name}{i:06d}", 2.75 + (i % 83) / 10) for i in range(n)],
                 {f"{name}{i:06d}" for i in range(n)}, spec, tmp / "cache")
                 for name, n in (("train", 89752), ("valid", 25232), ("test", 46366))]
        try:
            check_plans(plans, spec, tmp / "cache", 16, 1500)
            refused = ""
        except CacheBudgetError as e:
            refused = str(e)
        planning = time.perf_counter() - t0
        res = {"machine": C.machine_info(), "command": " ".join(sys.argv), "file_mb": (a.mb // 16) * 16,
               "first_hash_s": first, "hash_mb_per_s": (a.mb // 16) * 16 / first, "memoised_lookup_s": memoised,
               "plan_paper_splits_s": planning, "refusal": refused}
        print(f"sha256 of {res['file_mb']} MB: {first:.2f} s ({res['hash_mb_per_s']:.0f} MB/s, page cache warm); "
              f"memoised: {memoised * 1e6:.0f} us; planning 161,350 utterances in 3 splits: {planning:.2f} s")
        C.save_json(a.out, res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if "--child-build" in sys.argv:
        i = sys.argv.index("--child-build")
        model, n, where, out_dir = sys.argv[i + 1: i + 5]
        child_build(model, int(n), where, out_dir)
    elif "--identity" in sys.argv:
        p = argparse.ArgumentParser()
        p.add_argument("--identity", action="store_true")
        p.add_argument("--mb", type=int, default=1262, help="size of the hashed file (WavLM-Large: 1262 MB)")
        p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "feature_cache_identity.json"))
        identity_main(p.parse_args())
    elif "--scale" in sys.argv:
        p = argparse.ArgumentParser()
        p.add_argument("--scale", action="store_true")
        p.add_argument("--scale-n", type=int, default=100, help="utterances of the 1x corpus")
        p.add_argument("--pooled-n", type=int, default=32)
        p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "feature_cache_scale.json"))
        scale_main(p.parse_args())
    else:
        main()
