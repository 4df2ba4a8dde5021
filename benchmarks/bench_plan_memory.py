"""Validation of the memory planner: predicted (meta device, no compute) vs measured peak memory of the same
training steps on this CPU (issues 13.3, 22.1).

    .venv/bin/python benchmarks/bench_plan_memory.py [--out benchmarks/logs/plan_memory.json] [--only NAME ...]

Two tables. ``CONFIGS`` (the tracking method): AdaLTM steps as ``tools.plan_memory.train_steps`` writes them.
``BRAINS`` (what ``micro_batch_size: auto`` uses): every recipe's own Brain through
``lobes.memory_plan.BrainPredictor``: its YAML loaded with the models built at a small shape
(``tools.plan_memory.recipe_models``: WavLM ``SMALL``, a causal LM ``SMALL_LM``; seeded random weights), two
SpeechBrain ``fit_batch`` steps on a batch of one synthetic utterance repeated (``synthetic_item``).
Predicted = ``peak_bytes`` of the BrainPredictor (bf16 under the CPU autocast lists, what the CPU run uses);
measured = the same Brain and batch on the CPU (bf16 under ``torch.autocast('cpu')``), in a child process.

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


# a LLaMA-layout causal LM (Qwen2 is the same layout with q/k/v biases) small enough for a CPU
SMALL_LM = {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "max_position_embeddings": 4096, "attention_dropout": 0.0}
MSP = "recipes/MSP-Podcast"
HF = f"{MSP}/harmonifuse/hparams"
BRAINS = {
    "asr_ctc_fp32_b2_4s": {"hparams": f"{MSP}/asr_ctc/hparams/train_asr_ctc.yaml", "batch": 2, "seconds": 4.0},
    "ser_fp32_b2_4s": {"hparams": f"{MSP}/ser/hparams/train_ser.yaml", "batch": 2, "seconds": 4.0},
    "mtl_fully_trainable_fp32_b2_4s": {"hparams": f"{MSP}/mtl/hparams/rows/fully_trainable.yaml", "batch": 2,
                                       "seconds": 4.0},
    "adaltm_setup4_adaptive_fp32_b2_4s": {"hparams": f"{MSP}/adaltm/hparams/rows/setup4_dual.yaml", "batch": 2,
                                          "seconds": 4.0},
    "adaltm_setup1_cached_fp32_b8_4s": {"hparams": f"{MSP}/adaltm/hparams/rows/setup1_frozen.yaml", "batch": 8,
                                        "seconds": 4.0},
    "harmonifuse_lm_frozen_fp32_asr_b2_4s": {"hparams": f"{HF}/rows/lm_frozen.yaml", "batch": 2, "seconds": 4.0,
                                             "task": "asr"},
    "harmonifuse_lora_fp32_asr_b2_4s": {"hparams": f"{HF}/harmonifuse.yaml", "batch": 2, "seconds": 4.0,
                                        "task": "asr"},
    "harmonifuse_lm_full_fp32_asr_b2_4s": {"hparams": f"{HF}/rows/lm_full.yaml", "batch": 2, "seconds": 4.0,
                                           "task": "asr"},
    "harmonifuse_lora_bf16_ser_b2_4s": {"hparams": f"{HF}/harmonifuse.yaml", "batch": 2, "seconds": 4.0,
                                        "task": "ser", "precision": "bf16"},
}


def brain_setup(name, device):
    """(hparams with the models on ``device``, Brain class, batch) of a ``BRAINS`` configuration."""
    import speechbrain as sb

    from tools import plan_memory as PM

    cfg = BRAINS[name]
    hparams, brain_class = PM.load_meta_recipe(cfg["hparams"], {"precision": cfg.get("precision", "fp32")},
                                               json.dumps(SMALL), json.dumps(SMALL_LM), device=device)
    item = PM.synthetic_item(hparams, cfg["seconds"], cfg.get("task"))
    return hparams, brain_class, item, sb.dataio.batch.PaddedBatch([item] * cfg["batch"])


def brain_child(name):
    """The measured side: the recipe's Brain on the CPU, two fit_batch steps, PyTorch's CPU allocator peak."""
    import speechbrain as sb
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lobes.memory_tracking import storages

    torch.set_num_threads(1)
    cfg = BRAINS[name]
    hparams, brain_class, item, _ = brain_setup(name, "cpu")
    h = dict(hparams)
    if "batch_size" in h:
        h["batch_size"], h["micro_batch_size"] = cfg["batch"], cfg["batch"]
    h["grad_accumulation_factor"] = 1
    brain = brain_class(modules=h["modules"], opt_class=h["opt_class"], hparams=h, checkpointer=None,
                        run_opts={"device": "cpu", "precision": cfg.get("precision", "fp32")})
    brain.init_optimizers()
    brain.modules.train()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    gc.collect()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # collated here: its padded tensors stand for the batch's copy on a GPU (batch.to("cpu") copies nothing)
        batch = sb.dataio.batch.PaddedBatch([item] * cfg["batch"])
        for step in (1, 2):
            brain.step = step
            brain.fit_batch(batch)
    cur = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    model = sum(storages([t for m in h["modules"].values() for t in list(m.parameters()) + list(m.buffers())])
                .values())
    C.emit({"measured": model + peak, "measured_step_peak": peak, "model_bytes": model,
            "step_s": time.perf_counter() - t0})


def brain_rows(only):
    from lobes.memory_plan import BrainPredictor, peak_bytes

    rows = {}
    for name, cfg in BRAINS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        hparams, brain_class, item, _ = brain_setup(name, "cpu")
        pred = BrainPredictor(hparams, brain_class, item=item, seconds=cfg["seconds"], autocast_policy="cpu")(
            cfg["batch"])
        peak, t_pred = peak_bytes(pred, 1, 1), time.perf_counter() - t0
        meas = C.run_child(__file__, ["--brain_child", name], env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        err = peak / meas["measured"] - 1
        rows[name] = {**cfg, "predicted": peak, **{f"predicted_{k}": v for k, v in pred.items()},
                      "predict_s": t_pred, **meas, "error": err}
        print(f"{name:40s} predicted {peak / 2**20:8.1f} MiB (model {pred['model'] / 2**20:6.1f} + step "
              f"{pred['dynamic_peak'] / 2**20:7.1f} + kernel {pred['kernel_temp'] / 2**20:6.1f}), measured "
              f"{meas['measured'] / 2**20:8.1f} MiB (step {meas['measured_step_peak'] / 2**20:7.1f}): error "
              f"{100 * err:+.1f}%  [predict {t_pred:.1f} s, measure {meas['step_s']:.1f} s]", flush=True)
    return rows


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
    p.add_argument("--brain_child")
    p.add_argument("--only", nargs="*")
    a = p.parse_args(argv)
    if a.child:
        return child(a.child)
    if a.brain_child:
        return brain_child(a.brain_child)
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
    brains = brain_rows(a.only)
    C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "shape": SMALL, "lm_shape": SMALL_LM,
                        "rows": rows, "brains": brains})


if __name__ == "__main__":
    main()
