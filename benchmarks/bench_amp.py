"""bf16 autocast and gradient checkpointing: time and peak-memory ratios of a fine-tuning step (issue 8, target 5).

    .venv/bin/python benchmarks/bench_amp.py [--steps 2 --warmup 1] [--out benchmarks/logs/amp.json]

Same setup and measurement as ``bench_merge_step.py`` (its ``--child`` mode is reused: fresh process per
variant, WavLM-Base-shaped random init, batch 2 x 4 s, 2 threads, α + SER head, AdamW), for
``WavLMEncoder`` fine-tuning as the SER/ASR/MTL recipes configure it (CNN frozen), with
  precision fp32 | bf16 (``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward + loss; weights,
  gradients and AdamW state stay fp32, as SpeechBrain's ``precision: bf16`` does)
  x gradient checkpointing off | on (HF ``gradient_checkpointing_enable``, non-reentrant).
Context row: λ-training (``MergedWavLM(merge_impl="fused")``) under bf16 autocast.
Ratios are vs fp32 without checkpointing (fused rows: vs fused fp32).
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
    p.add_argument("--rounds", type=int, default=2, help="round-robin repeats; the quietest round counts")
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
        runs = {f"{v}/{prec}": [] for v, prec in RUNS}
        for rnd in range(a.rounds):
            for variant, precision in RUNS:
                r = C.run_child(STEP_SCRIPT, ["--child", variant, "--model-dir", model_dir, "--steps", a.steps,
                                              "--warmup", a.warmup, "--precision", precision])
                runs[f"{variant}/{precision}"].append(r)
                print(f"  round {rnd} {variant}/{precision}: {r['step_s']:.2f} s/step, peak RSS "
                      f"{C.gib(r['peak_rss']):.2f} GiB, load {[round(x, 1) for x in r['loadavg_1min']]}", flush=True)
        results = {k: C.aggregate(rs) for k, rs in runs.items()}
        ft = {k: r for k, r in results.items() if k.startswith("ft")}
        fused = {k: r for k, r in results.items() if k.startswith("fused")}
        C.add_ratios(ft, "ft_cnn_frozen/fp32")
        C.add_ratios(fused, "fused/fp32")
        C.print_table(results)
        C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "steps": a.steps,
                            "warmup": a.warmup, "rounds": a.rounds, "results": results, "runs": runs,
                            "wall_s": time.time() - t_start})
        print(f"\nwall {time.time() - t_start:.0f} s; written {a.out}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
