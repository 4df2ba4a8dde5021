"""bf16 autocast and gradient checkpointing: time and peak-memory ratios of a fine-tuning step (issue 8, target 5).

    .venv/bin/python benchmarks/bench_amp.py [--steps 2 --warmup 1] [--out benchmarks/logs/amp.json]

Same setup and measurement as ``bench_merge_step.py`` (its ``--child`` mode is reused: fresh process per
variant, WavLM-Base-shaped random init, batch 2 x 4 s, 2 threads, α + SER head, AdamW), for
``WavLMEncoder`` fine-tuning as the SER/ASR/MTL recipes configure it (CNN frozen), with
  precision fp32 | bf16 (``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward + loss; weights,
  gradients and AdamW state stay fp32, as SpeechBrain's ``precision: bf16`` does)
  x gradient checkpointing off | on (HF ``gradient_checkpointing_enable``, non-reentrant).
Context row: λ-training (``MergedWavLM(merge_impl="fused")``) under bf16 autocast.
Ratios are vs fp32 without checkpointing.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

STEP_SCRIPT = Path(__file__).resolve().parent / "bench_merge_step.py"
RUNS = [("ft_cnn_frozen", "fp32"), ("ft_cnn_frozen", "bf16"), ("ft_cnn_frozen_gc", "fp32"),
        ("ft_cnn_frozen_gc", "bf16"), ("fused", "fp32"), ("fused", "bf16")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="existing WavLM dir (default: a random-init WavLM-Base in a temp dir)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "amp.json"))
    a = p.parse_args(argv)
    C.set_threads()
    tmp = None
    model_dir = a.model_dir
    if model_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_amp_")
        model_dir = C.make_model_dir(Path(tmp) / "wavlm_base")
    try:
        t_start = time.time()
        results = {}
        for variant, precision in RUNS:
            r = C.run_child(STEP_SCRIPT, ["--child", variant, "--model-dir", model_dir, "--steps", a.steps,
                                          "--warmup", a.warmup, "--precision", precision])
            results[f"{variant}/{precision}"] = r
            print(f"  {variant}/{precision}: {r['step_s']:.2f} s/step, peak RSS {C.gib(r['peak_rss']):.2f} GiB, "
                  f"load {r['loadavg_1min']}", flush=True)
        refs = {"ft": results["ft_cnn_frozen/fp32"], "fused": results["fused/fp32"]}
        print(f"\n{'run':24s} {'step s':>7s} {'time x':>7s} {'cpu x':>6s} {'peak GiB':>8s} {'mem x':>6s} "
              f"{'above-import x':>14s}")
        for name, r in results.items():
            ref = refs["fused" if name.startswith("fused") else "ft"]
            r["time_ratio"] = r["step_s"] / ref["step_s"]
            r["cpu_ratio"] = r["cpu_s"] / ref["cpu_s"]
            r["peak_rss_ratio"] = r["peak_rss"] / ref["peak_rss"]
            r["above_import_ratio"] = (r["peak_rss"] - r["rss_import"]) / (ref["peak_rss"] - ref["rss_import"])
            print(f"{name:24s} {r['step_s']:7.2f} {r['time_ratio']:7.3f} {r['cpu_ratio']:6.3f} "
                  f"{C.gib(r['peak_rss']):8.2f} {r['peak_rss_ratio']:6.3f} {r['above_import_ratio']:14.3f}")
        C.save_json(a.out, {"machine": C.machine_info(), "steps": a.steps, "warmup": a.warmup,
                            "results": results, "wall_s": time.time() - t_start})
        print(f"\nwall {time.time() - t_start:.0f} s; written {a.out}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
