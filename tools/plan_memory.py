#!/usr/bin/env python3
"""Predict one GPU's peak training memory of any recipe or row YAML and plan its micro-batch (what
``micro_batch_size: auto`` does at start on a GPU), without a GPU and without downloads.

    python -m tools.plan_memory recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml --plans
    python -m tools.plan_memory recipes/MSP-Podcast/ser/hparams/train_ser.yaml --batch 8 --precision bf16
    python -m tools.plan_memory recipes/MSP-Podcast/harmonifuse/hparams/harmonifuse.yaml --lm_mode full \
        --task_duration asr=24.5 ser=11 --plans
    options: [--batch N] [--max_duration 11] [--precision fp32|bf16] [--gradient_checkpointing False|True|cnn]
        [--merge_impl ...] [--delta_dtype ...] [--lm_mode ...] [--set KEY=VALUE ...] [--gpus 1]
        [--shape large|JSON] [--lm_shape qwen2.5-0.5b|JSON] [--json out.json]

How: the YAML is loaded with its models built on PyTorch's ``meta`` device (:func:`recipe_models`: WavLM-Large's
configuration unless ``--shape``, task vectors of its shapes, Qwen2.5-0.5B's configuration for a causal LM unless
``--lm_shape``, with a character tokenizer fed as many tokens as a real one would get), and the recipe's own Brain
(from the train.py next to the YAML) runs two ``fit_batch`` steps on a synthetic batch of the longest utterance
through :class:`lobes.memory_plan.BrainPredictor`, the predictor ``micro_batch_size: auto`` uses; ``--plans``
prints its plan (or its refusal) on 1x24, 2x32 and 1x80 GB. HarmoniFuse is planned per task batch.

The AdaLTM-only functions (:func:`build_adaltm`, :func:`train_steps`, :func:`predict`) remain the reference of
the tracking method (benchmarks/bench_plan_memory.py, first table).
"""
import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from lobes.memory_tracking import EmulatedAutocast, FollowMeta, LiveMemory, SavedBytes, meta_values, storages

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
SAMPLE_RATE = 16000

# microsoft/wavlm-large (317M parameters)
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
         "do_stable_layer_norm": True, "feat_extract_norm": "layer", "conv_bias": True,
         "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
              "final_dropout": 0.0, "layerdrop": 0.0, "apply_spec_augment": False, "mask_time_prob": 0.0}
GPU_SETUPS = ((1, 24), (2, 32), (1, 80))  # (GPUs, GB each): a 24 GB card, the paper's 2 V100s, an A100/H100
# Qwen/Qwen2.5-0.5B's config.json (494M parameters, tied embeddings): HarmoniFuse's default LM, built on meta
QWEN25_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "attention_dropout": 0.0}
CHARS_PER_S = 15   # LibriSpeech reads ~15 characters per second: a CTC target of the longest utterance
TEXT_RATE = 4      # ... and ~4 BPE tokens per second (~2.7 words/s): the LM's target tokens


# ---------------------------------------------------------------------------------------------- the model
@contextlib.contextmanager
def _meta_safe():
    """Run lobes code on meta tensors: zero-valued reads, and checkpointing without RNG state stashing
    (torch.utils.checkpoint cannot stash a meta RNG; it saves nothing either way)."""
    from torch.utils.checkpoint import checkpoint

    import lobes.adaltm.merged_wavlm as mw

    def ckpt(fn, *args, **kwargs):
        return checkpoint(fn, *args, preserve_rng_state=False, **kwargs)

    merge_values = mw.merged_linear.merge_values

    def merge_following_meta(*args, **kwargs):
        with FollowMeta():
            return merge_values(*args, **kwargs)
    with meta_values(), mock.patch.object(mw, "checkpoint", ckpt), \
            mock.patch.object(mw.merged_linear, "merge_values", merge_following_meta):
        yield


def build_adaltm(config, num_vectors, lambda_mode="layerwise", merge_impl="materialized", delta_dtype=None,
                 gradient_checkpointing=False, head_hidden=256, pooling="mean", device="meta", seed=0):
    """(wavlm, weighted_sum, ser_head) of an AdaLTM row on ``device``: the recipe's own classes, with a WavLM
    built from ``config`` (random or meta weights) and random task vectors, instead of files."""
    from transformers import WavLMModel

    import lobes.adaltm.merged_wavlm as mw
    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    torch.manual_seed(seed)
    with torch.device(device):
        base = WavLMModel(config)
        state = base.state_dict()
        vectors = {f"tv{k}": {n: torch.randn_like(v) * 1e-3 for n, v in state.items()} for k in range(num_vectors)}
        with mock.patch.object(mw, "load_wavlm", lambda source, cache_dir=None: base), \
                (_meta_safe() if device == "meta" else contextlib.nullcontext()):
            wavlm = mw.MergedWavLM(f"<{device} {config.hidden_size}x{config.num_hidden_layers}>", vectors,
                                   lambda_mode=lambda_mode, delta_dtype=delta_dtype, merge_impl=merge_impl,
                                   gradient_checkpointing=gradient_checkpointing)
        del vectors, state
        weighted_sum = WeightedLayerSum(wavlm.num_layers)
        ser_head = SERHead(wavlm.hidden_size, head_hidden, pooling=pooling)
    return wavlm, weighted_sum, ser_head


def model_bytes(modules):
    """Bytes of every distinct parameter / buffer storage (W_base, ΔW, the materialized copy, λ, α, head)."""
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    return sum(storages(tensors).values()), storages(tensors)


def train_steps(modules, batch, seconds, precision="fp32", steps=2, device="meta", autocast_policy="cuda",
                lr=1e-4, track=None):
    """``steps`` AdaLTM training steps as the recipe's Brain runs them (autocast forward + loss, backward,
    AdamW step, zero_grad(set_to_none)); returns the tracker's peak and the bytes saved for backward."""
    wavlm, weighted_sum, ser_head = modules
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    track = LiveMemory() if track is None else track or contextlib.nullcontext()  # False: measure for real
    exclude = model_bytes(modules)[1]
    saved_max = 0
    n = int(seconds * SAMPLE_RATE)
    meta_safe = _meta_safe() if device == "meta" else contextlib.nullcontext()
    with track, meta_safe:
        opt = torch.optim.AdamW(params, lr=lr, foreach=False)
        for _ in range(steps):
            wavs = torch.randn(batch, n, device=device)
            lens = torch.ones(batch, device=device)
            soft = torch.full((batch, 8), 1 / 8, device=device)
            if precision != "bf16":
                amp = contextlib.nullcontext()
            elif autocast_policy == "real":  # the measured reference: torch's own autocast on a real device
                amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
            else:
                amp = EmulatedAutocast(autocast_policy)
            saved = SavedBytes(exclude)
            with saved, amp:
                hidden, mask = wavlm(wavs, lens)
                logits = ser_head(weighted_sum(hidden), mask)
                loss = -(soft * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
            saved_max = max(saved_max, saved.total)
            del hidden, mask, logits, amp, saved
            if loss.requires_grad:
                torch.autograd.backward(loss)  # not loss.backward(): a function mode would run it without itself
                opt.step()
                opt.zero_grad(set_to_none=True)
            del loss, wavs, lens, soft
    return {"dynamic_peak": getattr(track, "peak", None), "saved_for_backward": saved_max,
            "largest": getattr(track, "largest", None), "left_live": getattr(track, "live", None)}


def wavlm_config(shape="large", **overrides):
    from transformers import WavLMConfig

    cfg = dict(LARGE) if shape == "large" else json.loads(shape) if shape.startswith("{") else None
    if cfg is None:
        raise ValueError(f"--shape '{shape}' is not 'large' or a JSON dict of WavLMConfig fields")
    return WavLMConfig(**{**cfg, **NO_DROPOUT, **overrides})


def _ckpt(v):
    return {"true": True, "false": False, "cnn": "cnn"}[str(v).lower()]


_RUNS = {}  # (settings, batch, seconds, shape, device, policy) -> measured model + step: plans reuse them


def predict(settings, batch, seconds, gpus=1, shape="large", device="meta", autocast_policy="cuda"):
    """Predicted peak bytes of one GPU (process) for a micro-batch of ``batch`` utterances of ``seconds``."""
    key = json.dumps([settings, batch, seconds, shape, device, autocast_policy], sort_keys=True, default=str)
    if key not in _RUNS:
        cfg = wavlm_config(shape)
        delta = getattr(torch, settings["delta_dtype"]) if settings.get("delta_dtype") else None
        modules = build_adaltm(cfg, settings["num_vectors"], settings["lambda_mode"], settings["merge_impl"], delta,
                               _ckpt(settings["gradient_checkpointing"]), settings["head_hidden"],
                               settings["pooling"], device=device)
        trainable = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)
        run = train_steps(modules, batch, seconds, settings["precision"], device=device,
                          autocast_policy=autocast_policy)
        _RUNS[key] = {"model": model_bytes(modules)[0], "trainable": trainable, **run}
    r = _RUNS[key]
    ddp = r["trainable"] if gpus > 1 else 0  # DDP's gradient buckets: one more copy of the trainable gradients
    # kernels allocate internal temporaries that no op returns (invisible to LiveMemory); at most one runs at a
    # time, and none is larger than the largest tensor of the step: that is the allowance
    temp = r["largest"]
    return {"model": r["model"], "dynamic_peak": r["dynamic_peak"], "saved_for_backward": r["saved_for_backward"],
            "kernel_temp": temp, "ddp_buckets": ddp, "peak": r["model"] + r["dynamic_peak"] + temp + ddp,
            "trainable": r["trainable"]}


# ---------------------------------------------------------------------------------------------- any recipe
def lm_config(shape="qwen2.5-0.5b"):
    """A causal LM's transformers config: Qwen2.5-0.5B's (no download) or a JSON dict with ``model_type``."""
    from transformers import AutoConfig

    cfg = dict(QWEN25_05B) if shape == "qwen2.5-0.5b" else json.loads(shape) if shape.startswith("{") else None
    if cfg is None:
        raise ValueError(f"--lm_shape '{shape}' is not 'qwen2.5-0.5b' or a JSON dict of config fields")
    return AutoConfig.for_model(cfg.pop("model_type", "qwen2"), **cfg)


@contextlib.contextmanager
def recipe_models(wavlm_cfg, lm_cfg, device="meta"):
    """While a recipe YAML is loaded, its models are built on ``device`` (meta: shapes only; cpu: seeded random
    weights, for the validation) instead of read from files: WavLM of ``wavlm_cfg``, task vectors of its shapes,
    the causal LM of ``lm_cfg`` with the character tokenizer (one token per character; :data:`TEXT_RATE` keeps
    the token count of a real tokenizer)."""
    from transformers import AutoModelForCausalLM, WavLMModel

    import lobes.adaltm.merged_wavlm as mw
    import lobes.adaltm.task_vector as tv
    import lobes.harmonifuse.lm_loading as lml
    import lobes.wavlm_encoder as we

    def wavlm(source=None, cache_dir=None, output_loading_info=False, **overrides):
        cfg = type(wavlm_cfg)(**{**wavlm_cfg.to_dict(), **overrides})
        torch.manual_seed(0)
        with torch.device(device):
            model = WavLMModel(cfg)
        return (model, {"missing_keys": []}) if output_loading_info else model

    shapes = {k: (v.shape, v.dtype) for k, v in wavlm().state_dict().items()}

    def task_vector(path):
        g = torch.Generator().manual_seed(len(str(path)))
        return SimpleNamespace(delta={k: torch.empty(s, dtype=d, device="meta") if device == "meta" else
                                      1e-3 * torch.randn(s, generator=g).to(d) for k, (s, d) in shapes.items()})

    def causal_lm(source, from_config=False, dtype=torch.float32, attn_implementation="sdpa"):
        torch.manual_seed(0)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(lm_cfg, attn_implementation=attn_implementation).to(dtype)
    with mock.patch.object(we, "load_wavlm", wavlm), mock.patch.object(mw, "load_wavlm", wavlm), \
            mock.patch.object(tv, "load_task_vector", task_vector), mock.patch.object(lml, "load_causal_lm", causal_lm), \
            mock.patch.object(lml, "load_tokenizer", lambda source: lml.CharTokenizer()):
        yield


def recipe_brain(hparams_file):
    """The Brain class of the train.py next to ``hparams_file`` (``<recipe>/hparams[/rows]/x.yaml``)."""
    import importlib.util

    import speechbrain as sb

    folder = Path(hparams_file).resolve().parent
    while not (folder / "train.py").exists():
        if folder == folder.parent:
            raise ValueError(f"{hparams_file}: no train.py in a folder above it")
        folder = folder.parent
    name = "plan_" + "_".join(folder.relative_to(REPO).parts).replace("-", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "train.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    found = [c for c in vars(sys.modules[name]).values() if isinstance(c, type) and issubclass(c, sb.Brain)
             and c.__module__ == name]
    if len(found) != 1:
        raise ValueError(f"{folder / 'train.py'}: expected one Brain class, found {[c.__name__ for c in found]}")
    return found[0]


def load_meta_recipe(hparams_file, overrides=None, shape="large", lm_shape="qwen2.5-0.5b", device="meta"):
    """(hparams with every model on ``device``, Brain class) of any recipe or row YAML; ``overrides``: {key: YAML
    text}, those the YAML does not have are ignored (a recipe without task vectors has no vectors_folder)."""
    from lobes.hparams_io import _yaml, load_hparams, resolve_row

    keys = set(_yaml().load(resolve_row(hparams_file)))
    tmp = tempfile.mkdtemp(prefix="plan_memory_")
    fixed = {"output_folder": tmp, "wavlm_source": "meta://wavlm", "lm_source": "meta://lm", "skip_prep": "True",
             "vectors_folder": tmp, "data_folder": tmp, "msp_folder": tmp, "libri_folder": tmp,
             "number_of_epochs": "1", "layerdrop": "0.0", "apply_spec_augment": "False"}
    text = "\n".join(f"{k}: {v}" for k, v in {**fixed, **(overrides or {})}.items() if k in keys)
    with recipe_models(wavlm_config(shape), lm_config(lm_shape), device):
        hparams = load_hparams(hparams_file, text)[0]
    if "loss" in hparams and hasattr(hparams["loss"], "set_counts"):
        hparams["loss"].set_counts([1] * len(hparams["emotion_classes"]))
    return hparams, recipe_brain(hparams_file)


def cached_features(hparams):
    """True where the recipe trains on cached hidden states (AdaLTM: nothing upstream of them trains)."""
    wavlm = hparams["wavlm"]
    return bool(hparams.get("cache_features")) and (wavlm.num_vectors == 0 or not wavlm.lambdas.lam.requires_grad)


def synthetic_item(hparams, seconds, task=None, index=0):
    """One training element as the recipe's pipeline gives it, for an utterance of ``seconds``: audio (or the
    cached hidden states), an ASR transcript of :data:`CHARS_PER_S` characters per second (CTC) or
    :data:`TEXT_RATE` LM tokens per second (HarmoniFuse), an emotion label; ``task`` for HarmoniFuse."""
    from lobes import ctc_text

    n = int(seconds * SAMPLE_RATE)
    item = {"id": f"utt{index}"}
    if "cache_features" in hparams and cached_features(hparams):
        wavlm = hparams["wavlm"]
        item["feats"] = torch.zeros((n - 400) // 320 + 1, wavlm.num_layers + 1, wavlm.hidden_size)
    else:
        item["sig"] = torch.zeros(n)
    words = ("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG " * int(seconds * CHARS_PER_S / 44 + 1))
    words = words[:max(1, int(seconds * (TEXT_RATE if task else CHARS_PER_S)))].strip() or "A"
    item.update(wrd=words, tokens=ctc_text.encode(words))
    classes = len(hparams["emotion_classes"]) if "emotion_classes" in hparams else 8  # ASR recipes: unused
    item.update(emo_idx=torch.tensor([index % classes]), spk_id=f"spk{index}",
                soft_label=torch.nn.functional.one_hot(torch.tensor(index % classes), classes).float())
    if task:
        item["task"] = task
    return item


def recipe_predictors(hparams, brain_class, seconds, world=1, autocast_policy="cuda"):
    """{task or None: BrainPredictor} of a recipe on meta: HarmoniFuse one per trained task (its batches are of
    one task each), any other Brain one (``None``). ``seconds``: a number or {task: seconds}."""
    from lobes.memory_plan import BrainPredictor

    tasks = list(hparams["train_tasks"]) if "train_tasks" in hparams else [None]
    sec = seconds if isinstance(seconds, dict) else dict.fromkeys(tasks, seconds)
    return {t: BrainPredictor(hparams, brain_class, world=world, item=synthetic_item(hparams, sec.get(t, 11.0), t),
                              seconds=sec.get(t, 11.0), autocast_policy=autocast_policy) for t in tasks}


def plan_on(hparams, predictors, gpus, gpu_gb, context_gib=0.5):
    """The plan of ``micro_batch_size: auto`` on ``gpus`` x ``gpu_gb`` GB (1e9 bytes) cards whose CUDA context
    took ``context_gib``: {task: (micro, accumulation, peak bytes) or the refusal message}."""
    from lobes import memory_plan as MP

    free = gpu_gb * 1e9 - context_gib * GIB
    out = {}
    for task, pred in predictors.items():
        where = f"of {free / GIB:.1f} GiB free on {gpus} x {gpu_gb:g} GB"
        if task is not None:  # HarmoniFuse: its task batch as configured, no accumulation
            peak, error = MP.plan_task_batch(pred, hparams, task, gpus, free, where)
            out[task] = error or (hparams[f"{task}_batch_size"], 1, peak)
            continue
        picked = MP.plan_micro_batch(pred, hparams["batch_size"], gpus, free)
        out[task] = picked or MP.refusal(*MP.alternatives(pred, hparams, gpus, free), pred.seconds, where)
    return out


def describe(pred, micro, accum, gpus):
    from lobes.memory_plan import peak_bytes

    return (f"model {pred['model'] / GIB:.2f} GiB + step peak {pred['dynamic_peak'] / GIB:.2f} GiB + kernel "
            f"allowance {pred['kernel_temp'] / GIB:.2f} GiB"
            + (f" + gradients kept over accumulation {pred['trainable'] / GIB:.2f}" if accum > 1 else "")
            + (f" + DDP buckets {pred['trainable'] / GIB:.2f}" if gpus > 1 else "")
            + f" = {peak_bytes(pred, accum, gpus) / GIB:.2f} GiB per GPU")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hparams", help="any recipe or row YAML under recipes/")
    p.add_argument("--batch", type=int, help="micro-batch per GPU to predict (default: the YAML's micro_batch_size "
                   "if a number, else batch_size / gpus; HarmoniFuse: <task>_batch_size)")
    p.add_argument("--max_duration", type=float, default=11.0, help="longest utterance, s (MSP-Podcast: 11)")
    p.add_argument("--task_duration", nargs="*", default=[], metavar="TASK=SECONDS",
                   help="HarmoniFuse: per task, e.g. asr=24.5 (LibriSpeech train-clean-100's longest)")
    p.add_argument("--precision", choices=("fp32", "bf16"))
    p.add_argument("--gradient_checkpointing", choices=("False", "True", "cnn"))
    p.add_argument("--merge_impl", choices=("materialized", "fused", "functional"))
    p.add_argument("--delta_dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--lm_mode", choices=("frozen", "lora", "full"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more YAML overrides")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--shape", default="large", help="'large' (WavLM-Large) or a JSON dict of WavLMConfig fields")
    p.add_argument("--lm_shape", default="qwen2.5-0.5b", help="'qwen2.5-0.5b' or a JSON dict of LM config fields")
    p.add_argument("--plans", action="store_true", help="micro_batch_size: auto's plan on 1x24, 2x32, 1x80 GB")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    for k in ("precision", "merge_impl", "gradient_checkpointing", "lm_mode"):
        if getattr(a, k) is not None:
            overrides[k] = getattr(a, k)
    if a.delta_dtype:
        overrides["delta_dtype"] = f"!name:torch.{a.delta_dtype}"
    hparams, brain = load_meta_recipe(a.hparams, overrides, a.shape, a.lm_shape)
    seconds = {**dict.fromkeys(hparams["train_tasks"] if "train_tasks" in hparams else [], a.max_duration),
               **{k: float(v) for k, v in (kv.split("=", 1) for kv in a.task_duration)}} or a.max_duration
    predictors = recipe_predictors(hparams, brain, seconds, a.gpus)
    out = {"hparams": str(a.hparams), "brain": brain.__name__, "overrides": overrides, "max_duration": a.max_duration,
           "predictions": {}, "plans": []}
    longest = ", ".join(f"{t} {v:g} s" for t, v in seconds.items()) if isinstance(seconds, dict) else f"{seconds:g} s"
    print(f"{a.hparams} ({brain.__name__}, {hparams['precision']}), longest utterance {longest}, {a.gpus} GPU(s):")
    for task, pred in predictors.items():
        micro = a.batch or (hparams[f"{task}_batch_size"] if task else
                            hparams["micro_batch_size"] if isinstance(hparams["micro_batch_size"], int)
                            else max(1, hparams["batch_size"] // a.gpus))
        accum = 1 if task else max(1, hparams["batch_size"] // (micro * a.gpus))
        out["predictions"][str(task)] = {"batch": micro, "accum": accum, **pred(micro)}
        print(f"  {task + ' batch' if task else 'micro-batch'} {micro}: {describe(pred(micro), micro, accum, a.gpus)}")
    for gpus, gb in GPU_SETUPS if a.plans else ():  # a prediction is per process: the same for any GPU count
        for task, plan in plan_on(hparams, predictors, gpus, gb).items():
            what = f"{task}_batch_size" if task else "batch_size"
            if isinstance(plan, str):
                text = plan
            elif task:  # a global task batch: each GPU runs its share (lobes.memory_plan.plan_task_batch)
                text = (f"{what} {plan[0]}" + (f" = {-(-plan[0] // gpus)} per GPU" if gpus > 1 else "")
                        + f" (predicted {plan[2] / GIB:.1f} GiB per GPU)")
            else:
                text = f"micro-batch {plan[0]} x accum {plan[1]} (predicted {plan[2] / GIB:.1f} GiB per GPU)"
            print(f"  {gpus} x {gb} GB, {what}: {text}")
            out["plans"].append({"gpus": gpus, "gpu_gb": gb, "task": task, "plan": plan})
    if a.json:
        from lobes.io_utils import atomic_write

        with atomic_write(a.json) as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
