"""Validation of tools/plan_memory.py: predicted (meta device, no compute) vs measured peak memory of the same
AdaLTM training steps on this CPU (issue 13.3).

    .venv/bin/python benchmarks/bench_plan_memory.py [--out benchmarks/logs/plan_memory.json]

Each configuration runs in a fresh child process (``_common.run_child``) with glibc's mmap threshold at
64 kB (``MALLOC_MMAP_THRESHOLD_``), so every tensor buffer is its own mapping and is returned to the OS when
freed: resident memory then follows the live tensor bytes. The child builds the row's real modules on the
CPU (``plan_memory.build_adaltm``), notes its resident size after imports (``rss0``), builds the model, resets
the peak (VmHWM) and runs two training steps (forward, loss, backward, AdamW step; bf16 under torch's own
``torch.autocast('cpu')``). Measured = peak resident - rss0: the model's storages plus the steps' peak.
Predicted = ``plan_memory.predict`` of the same configuration on ``meta`` (bf16 with the CPU autocast op
lists, which is what the CPU run uses; the planner's default for GPUs is the CUDA lists).
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

# a WavLM-Large-layout model (stable layer norm, layer-norm CNN with bias, 512-channel CNN), small enough for a CPU
SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
         "do_stable_layer_norm": True, "feat_extract_norm": "layer", "conv_bias": True,
         "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}

CONFIGS = {
    "materialized_fp32_2vec_b4_4s": {"merge_impl": "materialized", "num_vectors": 2, "batch": 4, "seconds": 4.0},
    "fused_fp32_2vec_cnnckpt_b4_4s": {"merge_impl": "fused", "num_vectors": 2, "batch": 4, "seconds": 4.0,
                                          "gradient_checkpointing": "cnn"},
    "functional_fp32_1vec_ckpt_b2_6s": {"merge_impl": "functional", "num_vectors": 1, "batch": 2, "seconds": 6.0,
                                            "gradient_checkpointing": True},
    "materialized_bf16_deltabf16_b4_4s": {"merge_impl": "materialized", "num_vectors": 2, "batch": 4, "seconds": 4.0,
                                              "precision": "bf16", "delta_dtype": "bfloat16"},
}


def settings(cfg):
    return {"num_vectors": cfg["num_vectors"], "lambda_mode": "layerwise", "merge_impl": cfg["merge_impl"],
            "delta_dtype": cfg.get("delta_dtype"), "gradient_checkpointing": cfg.get("gradient_checkpointing", False),
            "precision": cfg.get("precision", "fp32"), "head_hidden": 256, "pooling": "mean", "batch_size": cfg["batch"]}


def child(name):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lobes.adaltm.merged_wavlm import _release_freed_memory
    from tools import plan_memory as PM

    torch.set_num_threads(1)
    cfg, s = CONFIGS[name], settings(CONFIGS[name])
    rss0 = C.rss_bytes()
    modules = PM.build_adaltm(PM.wavlm_config(json.dumps(SMALL)), s["num_vectors"], s["lambda_mode"], s["merge_impl"],
                              getattr(torch, s["delta_dtype"]) if s["delta_dtype"] else None,
                              s["gradient_checkpointing"], s["head_hidden"], s["pooling"], device="cpu")
    gc.collect()
    _release_freed_memory()
    rss_built = C.rss_bytes()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        PM.train_steps(modules, cfg["batch"], cfg["seconds"], s["precision"], device="cpu",
                       autocast_policy="real", track=False)
    step_s = time.perf_counter() - t0
    rss_peak = C.peak_rss_bytes() - rss0
    cur = peak = 0  # every allocation / free of PyTorch's CPU allocator, in time order
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    model = PM.model_bytes(modules)[0]
    C.emit({"measured": model + peak, "measured_step_peak": peak, "model_bytes": model, "rss_peak": rss_peak,
            "model_rss": rss_built - rss0, "step_s": step_s})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "plan_memory.json"))
    p.add_argument("--child")
    p.add_argument("--only", nargs="*")
    a = p.parse_args(argv)
    if a.child:
        return child(a.child)
    from tools import plan_memory as PM

    rows = {}
    for name, cfg in CONFIGS.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        pred = PM.predict(settings(cfg), cfg["batch"], cfg["seconds"], shape=json.dumps(SMALL),
                          autocast_policy="cpu")
        t_pred = time.perf_counter() - t0
        meas = C.run_child(__file__, ["--child", name], env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        err = pred["peak"] / meas["measured"] - 1
        rows[name] = {**cfg, "predicted": pred["peak"], "predicted_model": pred["model"],
                      "predicted_step_peak": pred["dynamic_peak"], "saved_for_backward": pred["saved_for_backward"],
                      "predict_s": t_pred, **meas, "error": err}
        print(f"{name:36s} predicted {pred['peak'] / 2**20:8.1f} MiB (model {pred['model'] / 2**20:6.1f} + step "
              f"{pred['dynamic_peak'] / 2**20:7.1f}), measured {meas['measured'] / 2**20:8.1f} MiB "
              f"(step {meas['measured_step_peak'] / 2**20:7.1f}; RSS {meas['rss_peak'] / 2**20:7.1f}): "
              f"error {100 * err:+.1f}%  [predict {t_pred:.1f} s]",
              flush=True)
    C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "shape": SMALL, "rows": rows})


if __name__ == "__main__":
    main()
