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


def run_child(script, args, timeout=900):
    """Run ``python script --child ...`` in a fresh process; returns the dict it printed as ``RESULT {json}``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
