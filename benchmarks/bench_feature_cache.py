"""Feature caching for static backbones (issue 8, target 2): a 100-epoch Setup-1 run with vs without the cache.

    .venv/bin/python benchmarks/bench_feature_cache.py [--epochs 100] [--uncached-epochs 1] [--out ...]

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
import _common as C  # noqa: E402

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


if __name__ == "__main__":
    main()
