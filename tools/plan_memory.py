#!/usr/bin/env python3
"""Predict the peak training memory of an AdaLTM row and plan micro-batch + gradient accumulation per GPU.

    python -m tools.plan_memory recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml \
        [--batch 8] [--max_duration 11] [--precision fp32|bf16] [--gradient_checkpointing False|True|cnn] \
        [--merge_impl materialized|fused|functional] [--delta_dtype float32|bfloat16] [--gpus 1]
    python -m tools.plan_memory <row.yaml> --plans        # effective batch 32 on 1x24 GB, 2x32 GB, 1x80 GB

How: the row's real model (lobes.adaltm.merged_wavlm.MergedWavLM + α + emotion head, WavLM-Large shape unless
``--shape``) runs two real training steps (forward, loss, backward, AdamW step) on PyTorch's ``meta`` device,
where tensors have shapes and dtypes but no data, so nothing is computed and a step takes about a second.
:class:`LiveMemory` (a ``TorchDispatchMode``) sees every tensor an op creates and, through weak references,
when its storage is freed: the running sum of live storages and its maximum give the step's peak,
including what autograd saves for backward, the gradients, the transients of backward and the optimizer
states, exactly as the PyTorch ops allocate them. Parameters, task vectors and the materialized copy of
W_base are added from the modules' storages. ``bf16`` is emulated by :class:`EmulatedAutocast` (the CUDA
autocast op lists; ``autocast`` itself ignores meta tensors). Values never matter for memory: ``.tolist()`` /
``.item()`` of a meta tensor read as zeros (:func:`meta_values`).

On a GPU the CUDA caching allocator adds fragmentation and the CUDA context ~0.5-1 GB: a plan must keep
``predicted x (1 + margin) + overhead_gib`` under the GPU's memory (defaults: 15%, 1.5 GiB). Validated against
the measured peak of the same steps on this CPU (benchmarks/bench_plan_memory.py; benchmarks/RESULTS.md).
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path
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
EFFECTIVE_BATCH = 32


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


# ---------------------------------------------------------------------------------------------- rows
def _tag_value(v):
    """A YAML value as a plain Python value (``!name:torch.bfloat16`` -> 'bfloat16')."""
    tag = getattr(getattr(v, "tag", None), "value", None) or getattr(v, "tag", None)
    if isinstance(tag, str) and tag.startswith("!name:torch."):
        return tag[len("!name:torch."):]
    return v


def read_row(row_file):
    """The settings of a row that decide memory, from its YAML folded into the recipe YAML (no instantiation)."""
    import ruamel.yaml

    from lobes.hparams_io import resolve_row

    y = ruamel.yaml.YAML()
    h = y.load(resolve_row(row_file))
    delta = _tag_value(h.get("delta_dtype"))
    return {"num_vectors": len(h.get("task_vectors") or {}), "lambda_mode": str(h["lambda_mode"]),
            "merge_impl": str(h["merge_impl"]), "delta_dtype": None if delta in (None, "null") else str(delta),
            "gradient_checkpointing": h["gradient_checkpointing"], "batch_size": int(h["batch_size"]),
            "micro_batch_size": h["micro_batch_size"],
            "precision": str(h["precision"]), "head_hidden": int(h["head_hidden"]), "pooling": str(h["pooling"]),
            "cache_features": bool(h["cache_features"]), "experiment": str(h["experiment"])}


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


def fits(peak, gpu_gb, margin, overhead_gib):
    """A "24 GB" / "32 GB" / "80 GB" card holds that many bytes x 1e9 (an A10 / L4 "24 GB" shows ~22.5 GiB)."""
    return peak * (1 + margin) + overhead_gib * GIB <= gpu_gb * 1e9


def plan(settings, seconds, gpus, gpu_gb, margin=0.15, overhead_gib=1.5, effective=EFFECTIVE_BATCH, shape="large"):
    """The fastest setting reaching ``effective`` utterances per optimizer step on ``gpus`` x ``gpu_gb`` GB:
    no checkpointing before CNN-only before full (recomputation costs time), then the largest micro-batch
    (fewest accumulation steps). Peak is affine in the micro-batch (measured at 1 and 2, checked at the pick)."""
    per_gpu = effective // gpus
    options = [False, "cnn", True]
    start = options.index(_ckpt(settings["gradient_checkpointing"]))
    for ckpt in options[start:]:
        s = {**settings, "gradient_checkpointing": ckpt}
        p1, p2 = (predict(s, b, seconds, gpus, shape)["peak"] for b in (1, 2))
        for micro in [b for b in range(per_gpu, 0, -1) if per_gpu % b == 0]:
            if fits(p1 + (micro - 1) * (p2 - p1), gpu_gb, margin, overhead_gib):
                direct = predict(s, micro, seconds, gpus, shape)
                if fits(direct["peak"], gpu_gb, margin, overhead_gib):
                    return {"gpus": gpus, "gpu_gb": gpu_gb, "micro_batch_size": micro,
                            "grad_accumulation_factor": per_gpu // micro, "gradient_checkpointing": ckpt,
                            "precision": s["precision"], "merge_impl": s["merge_impl"],
                            "delta_dtype": s["delta_dtype"], "peak_gib": direct["peak"] / GIB,
                            "effective_batch": micro * (per_gpu // micro) * gpus}
    return None


def describe(pred):
    return (f"model (W_base, ΔW, copies, λ/α/head) {pred['model'] / GIB:.2f} GiB + step peak "
            f"{pred['dynamic_peak'] / GIB:.2f} GiB (of which saved for backward {pred['saved_for_backward'] / GIB:.2f})"
            f" + kernel temporaries {pred['kernel_temp'] / GIB:.2f}"
            + (f" + DDP buckets {pred['ddp_buckets'] / GIB:.3f}" if pred["ddp_buckets"] else "")
            + f" = {pred['peak'] / GIB:.2f} GiB per GPU")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("row", help="an AdaLTM row YAML (or adaltm.yaml)")
    p.add_argument("--batch", type=int, help="micro-batch per GPU (default: the row's micro_batch_size, else its "
                   "global batch_size / gpus)")
    p.add_argument("--max_duration", type=float, default=11.0, help="longest utterance, s (MSP-Podcast: 11)")
    p.add_argument("--precision", choices=("fp32", "bf16"))
    p.add_argument("--gradient_checkpointing", choices=("False", "True", "cnn"))
    p.add_argument("--merge_impl", choices=("materialized", "fused", "functional"))
    p.add_argument("--delta_dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--shape", default="large", help="'large' (WavLM-Large) or a JSON dict of WavLMConfig fields")
    p.add_argument("--plans", action="store_true", help="settings for effective batch 32 on 1x24, 2x32, 1x80 GB")
    p.add_argument("--margin", type=float, default=0.15, help="allocator fragmentation allowance")
    p.add_argument("--overhead_gib", type=float, default=1.5, help="CUDA context + workspace per GPU")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    s = read_row(a.row)
    for k in ("precision", "merge_impl", "delta_dtype", "gradient_checkpointing"):
        if getattr(a, k) is not None:
            s[k] = getattr(a, k)
    if s["num_vectors"] == 0 or s["lambda_mode"] == "fixed":
        print(f"{s['experiment']}: nothing upstream of the features trains, so the backbone runs once under "
              "no_grad (feature cache) and training holds only α + head; the figures below are the cache build.")
    out = {"row": str(a.row), "settings": s, "max_duration": a.max_duration}
    batch = a.batch or s["micro_batch_size"] or max(1, s["batch_size"] // a.gpus)
    pred = predict(s, batch, a.max_duration, a.gpus, a.shape)
    out["prediction"] = {"batch": batch, "gpus": a.gpus, **pred}
    print(f"{s['experiment']} ({s['num_vectors']} task vectors, λ {s['lambda_mode']}, {s['merge_impl']}, "
          f"{s['precision']}, checkpointing {s['gradient_checkpointing']}, ΔW {s['delta_dtype'] or 'float32'}), "
          f"micro-batch {batch} x {a.max_duration:g} s on {a.gpus} GPU(s):\n  {describe(pred)}")
    if a.plans:
        out["plans"] = []
        print(f"\nbatch_size {EFFECTIVE_BATCH} (global: micro_batch_size x grad_accumulation_factor x GPUs), "
              f"{a.max_duration:g} s utterances, peak x {1 + a.margin:.2f} + {a.overhead_gib} GiB must fit:")
        for gpus, gb in GPU_SETUPS:
            best = plan(s, a.max_duration, gpus, gb, a.margin, a.overhead_gib, shape=a.shape)
            out["plans"].append(best)
            if best is None:
                print(f"  {gpus} x {gb} GB: does not fit even at micro-batch 1 with full checkpointing")
            else:
                print(f"  {gpus} x {gb} GB: micro_batch_size {best['micro_batch_size']} (grad_accumulation_factor "
                      f"{best['grad_accumulation_factor']}), gradient_checkpointing {best['gradient_checkpointing']}"
                      f"  (predicted {best['peak_gib']:.1f} GiB per GPU)")
    if a.json:
        sys.path.insert(0, str(REPO))
        from lobes.io_utils import atomic_write

        with atomic_write(a.json) as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
