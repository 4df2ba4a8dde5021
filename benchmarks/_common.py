"""Shared helpers of the benchmark scripts: the WavLM-Base-shaped config, memory probes, child processes.

Memory is measured per variant in a fresh child process (so one variant's allocator state cannot leak into
another's) from ``/proc/self/status``: VmRSS (resident now) and VmHWM (peak resident), with the peak reset
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) right before the measured region, so model construction
and imports do not count towards the step's peak.
"""
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

THREADS = 2
GIB = 2 ** 30


def base_config(**overrides):
    """WavLM-Base shape (94.4M params): hidden 768, 12 layers, 12 heads, FFN 3072, default 7-layer CNN,
    post-norm layout (``do_stable_layer_norm=False``, group-norm CNN, as microsoft/wavlm-base).

    Dropout, LayerDrop and SpecAugment are off in every variant, so every variant computes the same
    function and only the training machinery differs (fine-tuning with dropout would need more memory
    for the dropout masks, i.e. these ratios are conservative for the merge variants).
    """
    from transformers import WavLMConfig

    cfg = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
               final_dropout=0.0, layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.0,
               do_stable_layer_norm=False)
    cfg.update(overrides)
    return WavLMConfig(**cfg)


def make_model_dir(out, config=None, seed=0):
    """A random-init (seeded) ``save_pretrained`` directory of ``config`` (built in memory, no download)."""
    import torch
    from transformers import WavLMModel

    out = Path(out)
    if not (out / "config.json").exists():
        torch.manual_seed(seed)
        WavLMModel(config or base_config()).save_pretrained(out, safe_serialization=True)
    return out


def _status(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def rss_bytes():
    return _status("VmRSS")


def peak_rss_bytes():
    return _status("VmHWM")


def reset_peak_rss():
    """Restart the VmHWM high-water mark at the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def set_threads():
    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)


def machine_info():
    import torch
    import transformers

    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except Exception:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": THREADS, "gpu": torch.cuda.is_available(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def run_child(script, args, timeout=900, env=None):
    """Run ``python script --child ...`` in a fresh process; returns the dict it printed as ``RESULT {json}``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    proc = subprocess.run([sys.executable, str(script)] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {script} {args} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")


def emit(result):
    """Child side of :func:`run_child`."""
    print("RESULT " + json.dumps(result), flush=True)


def save_json(path, obj):
    from lobes.io_utils import atomic_write

    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def gib(x):
    return x / GIB


def aggregate(runs):
    """One variant's child results over rounds -> one row.

    Time: the fastest measured step over all rounds (``step_s``, with that step's forward / backward /
    optimizer split): on a shared machine load from other processes only ever adds time, so the minimum is
    the least disturbed estimate. Also kept: ``median_quietest_round_s`` (median of the steps of the round
    with the lowest median) and ``median_all_steps_s``. Memory: mean over rounds.
    """
    steps = [st for r in runs for st in r["steps"]]
    best = min(steps, key=lambda st: st["step_s"])
    row = dict(best)
    row["median_quietest_round_s"] = min(r["step_s"] for r in runs)
    row["median_all_steps_s"] = median([st["step_s"] for st in steps])
    row["loadavg_1min"] = [r["loadavg_1min"] for r in runs]
    for k in ("peak_rss", "rss_import", "rss_built"):
        row[k] = sum(r[k] for r in runs) / len(runs)
    row["above_import"] = row["peak_rss"] - row["rss_import"]
    row["trainable_backbone_params"] = runs[0]["trainable_backbone_params"]
    return row


def add_ratios(results, ref_name):
    ref = results[ref_name]
    for r in results.values():
        r["time_ratio"] = r["step_s"] / ref["step_s"]
        r["median_time_ratio"] = r["median_quietest_round_s"] / ref["median_quietest_round_s"]
        r["cpu_ratio"] = r["cpu_s"] / ref["cpu_s"]
        r["peak_rss_ratio"] = r["peak_rss"] / ref["peak_rss"]
        r["above_import_ratio"] = r["above_import"] / ref["above_import"]


def print_table(results):
    print(f"\n{'variant':24s} {'step s':>7s} {'time x':>7s} {'med x':>6s} {'cpu x':>6s} {'fwd s':>6s} {'bwd s':>6s} "
          f"{'opt s':>6s} {'peak GiB':>8s} {'mem x':>6s} {'above-import GiB':>16s} {'x':>6s}")
    for v, r in results.items():
        print(f"{v:24s} {r['step_s']:7.2f} {r['time_ratio']:7.3f} {r['median_time_ratio']:6.3f} {r['cpu_ratio']:6.3f} "
              f"{r['forward_s']:6.2f} "
              f"{r['backward_s']:6.2f} {r['optimizer_s']:6.2f} {gib(r['peak_rss']):8.2f} "
              f"{r['peak_rss_ratio']:6.3f} {gib(r['above_import']):16.2f} {r['above_import_ratio']:6.3f}")
