#!/usr/bin/env python3
"""GPU smoke run: a few real training steps of every recipe at WavLM-Large shape, bf16, 11 s utterances.

    python benchmarks/gpu_smoke.py --device cuda --steps 3 --batch 8 --work /tmp/gpu_smoke   (benchmarks/gpu_smoke.sh)
    python benchmarks/gpu_smoke.py --device cpu --tiny --steps 1                             (checks this script)

Each recipe's Brain is built from its real YAML (row files too) through ``lobes.hparams_io.load_hparams`` and
trained with SpeechBrain's own ``fit_batch`` (AMP bf16 via ``precision=bf16``) on synthetic batches of
``--batch`` utterances of ``--seconds`` s. Weights: a random-init WavLM-Large written locally by
:func:`make_models` (no hub), random task vectors (ΔW = 0.01·N(0, 1)) in the task-vector format, and for
HarmoniFuse a random LLaMA-layout LM of Qwen2.5-0.5B's shape (vocab 151936) with the character tokenizer.
Per recipe it prints s/step (median of ``--steps`` steps after one warm-up step), the memory planner's predicted
peak of one GPU (``lobes.memory_plan.BrainPredictor`` on a meta copy of the same modules, micro-batch, duration
and precision: every row), the measured peaks over the warm-up and timed steps, model included
(``torch.cuda.max_memory_allocated``: tensors; ``max_memory_reserved``: what the caching allocator held, the
number that must fit the card) and both divided by the prediction; one line of JSON per recipe goes to ``--out``.
Exit status 1 if any recipe fails (the others still run).
"""
import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MSP = REPO / "recipes" / "MSP-Podcast"
ROWS = MSP / "adaltm" / "hparams" / "rows"
N_CLASSES = 8
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
         "do_stable_layer_norm": True, "conv_bias": True, "feat_extract_norm": "layer",
         "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}
QWEN05_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096}

# name, train.py, hparams file, Brain class, batch kind, overrides
CASES = [
    ("asr_ctc_msp", MSP / "asr_ctc/train.py", MSP / "asr_ctc/hparams/train_asr_ctc.yaml", "ASRBrain", "asr", {}),
    ("asr_ctc_librispeech", REPO / "recipes/LibriSpeech/asr_ctc/train.py",
     REPO / "recipes/LibriSpeech/asr_ctc/hparams/train_asr_ctc.yaml", "ASRBrain", "asr", {}),
    ("ser", MSP / "ser/train.py", MSP / "ser/hparams/train_ser.yaml", "SERBrain", "ser", {}),
    ("ser-gc", MSP / "ser/train.py", MSP / "ser/hparams/train_ser.yaml", "SERBrain", "ser",
     {"gradient_checkpointing": True}),
    ("mtl_fully_trainable", MSP / "mtl/train.py", MSP / "mtl/hparams/rows/fully_trainable.yaml", "MTLBrain", "mtl", {}),
    ("mtl_static_init", MSP / "mtl/train.py", MSP / "mtl/hparams/rows/static_init.yaml", "MTLBrain", "mtl", {}),
] + [
    (f"adaltm_{row}", MSP / "adaltm/train.py", ROWS / f"{row}.yaml", "AdaLTMBrain", "ser", {"cache_features": False})
    for row in ("setup1_frozen", "setup2_asr_only", "setup3_ser_only", "setup4_dual", "out_of_domain_dual",
                "adaptive_global", "static_global")
] + [
    (f"adaltm_setup4_dual-{impl}", MSP / "adaltm/train.py", ROWS / "setup4_dual.yaml", "AdaLTMBrain", "ser",
     {"merge_impl": impl})
    for impl in ("fused", "functional")
] + [
    ("adaltm_setup4_dual-gc_cnn", MSP / "adaltm/train.py", ROWS / "setup4_dual.yaml", "AdaLTMBrain", "ser",
     {"gradient_checkpointing": "cnn"}),
    ("adaltm_setup2_asr_only-fused", MSP / "adaltm/train.py", ROWS / "setup2_asr_only.yaml", "AdaLTMBrain", "ser",
     {"merge_impl": "fused"}),
] + [
    (f"harmonifuse_{row}", MSP / "harmonifuse/train.py", MSP / f"harmonifuse/hparams/rows/{row}.yaml",
     "HarmoniFuseBrain", "hf", {})
    for row in ("full", "static_encoder_fusion", "single_task_ser")
]


def make_models(root, tiny):
    """Random-init WavLM (Large, or the test suite's tiny one), task vectors and a causal LM under ``root``."""
    from transformers import AutoConfig, AutoModelForCausalLM, WavLMConfig, WavLMModel

    from lobes.adaltm.task_vector import compute_task_vector, save_task_vector
    from lobes.harmonifuse.lm_loading import CharTokenizer
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm

    root = Path(root)
    wavlm_dir, lm_dir, vec_dir = root / "wavlm", root / "lm", root / "vectors"
    if tiny:
        make_tiny_wavlm(wavlm_dir)
        make_tiny_lm(lm_dir)
    else:
        if not (wavlm_dir / "config.json").exists():
            torch.manual_seed(0)
            WavLMModel(WavLMConfig(**LARGE)).save_pretrained(wavlm_dir, safe_serialization=True)
        if not (lm_dir / "config.json").exists():
            cfg = json.loads((REPO / "tools/tiny_configs/causal_lm.json").read_text())
            cfg.update(QWEN05_SHAPE)
            model_type = cfg.pop("model_type")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).save_pretrained(
                lm_dir, safe_serialization=True)
            CharTokenizer().save_pretrained(lm_dir)
    vec_dir.mkdir(parents=True, exist_ok=True)
    base = WavLMModel.from_pretrained(wavlm_dir).state_dict()
    for i, name in enumerate(("asr_in", "asr_out", "ser")):
        path = vec_dir / f"{name}.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(i)
            ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                  for k, v in base.items()}
            save_task_vector(compute_task_vector(base, ft, name), path)
            del ft
    return wavlm_dir, lm_dir, vec_dir


def make_items(kind, task, batch_size, seconds):
    from lobes import ctc_text

    n = int(seconds * 16000)
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(batch_size):
        item = {"id": f"utt{i}", "sig": 0.1 * torch.randn(n, generator=g)}
        if kind in ("asr", "mtl") or task == "asr":
            words = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND RUNS AWAY"  # ~11 s of speech
            item.update(wrd=words, tokens=ctc_text.encode(words))
        if kind in ("ser", "mtl") or task == "ser":
            soft = torch.zeros(N_CLASSES)
            soft[i % N_CLASSES] = 1.0
            item.update(emo_idx=torch.tensor([i % N_CLASSES]), soft_label=soft, spk_id=f"spk{i}")
        if task:
            item["task"] = task
        items.append(item)
    return items


def make_batch(kind, task, batch_size, seconds):
    import speechbrain as sb

    return sb.dataio.batch.PaddedBatch(make_items(kind, task, batch_size, seconds))


def load_train_py(path):
    import importlib.util

    name = "smoke_" + "_".join(Path(path).relative_to(REPO).with_suffix("").parts).replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def predicted_gib(case, hparams, brain_class, args, precision):
    """The planner's predicted peak (GiB) of one GPU for ``case``: ``lobes.memory_plan.BrainPredictor`` (what
    ``micro_batch_size: auto`` uses) on a meta copy of the very modules just measured, ``--batch`` copies of
    one of the measured utterances, two ``fit_batch`` steps, bf16 under CUDA's autocast lists; HarmoniFuse:
    the larger of its task batches (the measured steps alternate them)."""
    from lobes.memory_plan import GIB, BrainPredictor, peak_bytes

    kind = case[4]
    tasks = list(hparams["train_tasks"]) if kind == "hf" else [None]
    peaks = [peak_bytes(BrainPredictor(hparams, brain_class, item=make_items(kind, task, 1, args.seconds)[0],
                                       seconds=args.seconds)(args.batch, precision=precision), 1, 1)
             for task in tasks]
    return max(peaks) / GIB


def memory_columns(predicted, allocated, reserved):
    """Predicted / allocated / reserved GiB and the two ratios to the prediction ("-" where a value is missing)."""
    def ratio(x):
        return "-" if predicted is None or x is None else f"{x / predicted:.2f}"
    gib = ["-" if v is None else f"{v:.2f}" for v in (predicted, allocated, reserved)]
    return [*gib, ratio(allocated), ratio(reserved)]


MEMORY_HEADER = ["pred GiB", "alloc GiB", "resv GiB", "alloc/pred", "resv/pred"]


def run_case(case, models, args, work):
    from lobes.hparams_io import _yaml, load_hparams, resolve_row

    name, train_py, hparams_file, brain_cls, kind, extra = case
    wavlm_dir, lm_dir, vec_dir = models
    cuda = args.device.startswith("cuda")
    precision = "bf16" if cuda else "fp32"
    module = load_train_py(train_py)
    overrides = {"output_folder": str(work / "exp" / name), "wavlm_source": str(wavlm_dir), "skip_prep": True,
                 "vectors_folder": str(vec_dir), "precision": precision, "data_folder": str(work),
                 "msp_folder": str(work), "libri_folder": str(work), "lm_source": str(lm_dir),
                 "cache_features": False, "batch_size": args.batch}  # one micro-batch = one optimizer step
    keys = set(_yaml().load(resolve_row(hparams_file)))
    overrides = {k: v for k, v in overrides.items() if k in keys}
    overrides.update({k: v for k, v in extra.items() if k in keys})
    hparams, _, _ = load_hparams(hparams_file, overrides)
    if "init_task_vectors" in hparams:  # MTL main(): static init before the Brain exists
        module.apply_static_merge(hparams["wavlm"].model, hparams["init_task_vectors"], hparams["init_lambda"])
    if hasattr(hparams.get("loss"), "set_counts"):
        hparams["loss"].set_counts([10 * (i + 1) for i in range(N_CLASSES)])
    brain = getattr(module, brain_cls)(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                                       run_opts={"device": args.device, "precision": precision},
                                       checkpointer=hparams["checkpointer"])
    brain.on_fit_start()
    brain.modules.train()
    brain.on_stage_start(__import__("speechbrain").Stage.TRAIN, 1)
    if kind == "hf":
        tasks = list(hparams["train_tasks"])
        batches = [make_batch(kind, tasks[i % len(tasks)], args.batch, args.seconds) for i in range(len(tasks))]
    else:
        batches = [make_batch(kind, None, args.batch, args.seconds)]
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(1 + args.steps):  # step 0 warms up (allocator, cuDNN autotune), not timed
        t0 = time.perf_counter()
        brain.step = step + 1
        loss = brain.fit_batch(batches[step % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss}")
    # no CUDA: not measured
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None
    del brain, batches
    try:  # after the steps: the meta-device prediction must not touch the measured peaks
        predicted = predicted_gib(case, hparams, getattr(module, brain_cls), args, precision)
        predict_error = None
    except Exception as e:  # noqa: BLE001 -- shown in the row and the JSON: the measurement still counts
        predicted, predict_error = None, f"{type(e).__name__}: {e}"
    del hparams
    return row_result(name, precision, args, times, loss, predicted, peak, reserved, predict_error)


def row_result(name, precision, args, times, loss, predicted, peak, reserved, predict_error):
    def r3(x):
        return None if x is None else round(x, 3)
    result = {"recipe": name, "precision": precision, "batch": args.batch, "seconds": args.seconds,
              "s_per_step": round(statistics.median(times), 4), "loss": round(float(loss), 4),
              "predicted_gib": r3(predicted), "peak_gib": r3(peak), "reserved_gib": r3(reserved),
              "allocated_over_predicted": None if None in (peak, predicted) else round(peak / predicted, 3),
              "reserved_over_predicted": None if None in (reserved, predicted) else round(reserved / predicted, 3),
              "predict_error": predict_error}
    result["columns"] = memory_columns(predicted, peak, reserved)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny WavLM / LM (check the script on a CPU)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=11.0)
    p.add_argument("--work", default="/tmp/gpu_smoke")
    p.add_argument("--only", default="", help="comma-separated substrings of recipe names to run")
    p.add_argument("--out", default=None, help="JSON lines file (default: <work>/gpu_smoke.jsonl)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_setup = time.perf_counter()
    models = make_models(work / ("tiny" if args.tiny else "large"), args.tiny)
    print(f"models ready in {time.perf_counter() - t_setup:.1f} s: {models[0]}", flush=True)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    only = [s for s in args.only.split(",") if s]
    out = Path(args.out) if args.out else work / "gpu_smoke.jsonl"
    failures = []
    print(f"{'recipe':40s} {'s/step':>8s} " + " ".join(f"{h:>10s}" for h in MEMORY_HEADER), flush=True)
    with out.open("w") as f:
        for case in CASES:
            if only and not any(s in case[0] for s in only):
                continue
            try:
                r = run_case(case, models, args, work)
                columns = " ".join(f"{c:>10s}" for c in r.pop("columns"))
                print(f"{r['recipe']:40s} {r['s_per_step']:8.3f} {columns}"
                      + (f"   (planner failed: {r['predict_error']})" if r["predict_error"] else ""), flush=True)
                f.write(json.dumps(r) + "\n")
            except Exception:  # noqa: BLE001 -- report and go on: one broken recipe must not hide the others' numbers
                failures.append(case[0])
                print(f"{case[0]:40s} FAILED\n{traceback.format_exc()}", flush=True)
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    print(f"results: {out}")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
