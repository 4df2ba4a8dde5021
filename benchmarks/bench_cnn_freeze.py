#!/usr/bin/env python3
"""Activations saved for backward by a fine-tuning forward with the CNN frozen: ``requires_grad_(False)`` on the
CNN only (before) vs HF's ``freeze_feature_encoder()`` (after, what ``WavLMEncoder`` does).

With ``requires_grad_(False)`` alone, HF's WavLMFeatureEncoder still sets ``hidden_states.requires_grad = True``
in train mode, so autograd records the 7 conv layers and keeps their inputs/outputs for a backward whose only
result is discarded. Counted with ``torch.autograd.graph.saved_tensors_hooks``: bytes of distinct storages
saved during one training forward + loss, parameters excluded. WavLM-Large shape (hidden 1024, 16 heads, FFN
4096, 7-layer CNN of 512 channels, stable layer norm) with ``--layers`` transformer layers (the transformer
layers save the same in both variants, so the difference is the CNN's, independent of the layer count).

    python benchmarks/bench_cnn_freeze.py [--seconds 4] [--layers 2] [--shape large|tiny]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import WavLMConfig, WavLMModel

from lobes.wavlm_encoder import run_wavlm


def config(shape, layers):
    if shape == "tiny":
        cfg = json.loads((Path(__file__).resolve().parents[1] / "tools/tiny_configs/wavlm.json").read_text())
        cfg.pop("model_type", None)
        cfg["num_hidden_layers"] = layers
        return WavLMConfig(**cfg)
    return WavLMConfig(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=4096,
                       feat_extract_norm="layer", do_stable_layer_norm=True, layerdrop=0.0,
                       apply_spec_augment=False, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       feat_proj_dropout=0.0)


def saved_bytes(model, wavs, lens):
    """(bytes, count) of distinct non-parameter storages saved for backward in one forward + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, _ = run_wavlm(model, wavs, lens)
        loss = hidden.float().pow(2).mean()
    loss.backward()
    return sum(seen.values()), len(seen)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--shape", choices=["large", "tiny"], default="large")
    p.add_argument("--out", default=None, help="JSON log (default: benchmarks/logs/cnn_freeze_<shape>.json)")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    model = WavLMModel(config(a.shape, a.layers)).train()
    wavs = torch.randn(1, int(16000 * a.seconds))
    lens = torch.ones(1)
    results = {}
    for variant in ("requires_grad_false", "freeze_feature_encoder"):
        model.feature_extractor._requires_grad = True
        model.requires_grad_(True)
        if variant == "requires_grad_false":
            model.feature_extractor.requires_grad_(False)  # what the recipes did
        else:
            model.freeze_feature_encoder()                  # what WavLMEncoder does now
        t0 = time.perf_counter()
        nbytes, n = saved_bytes(model, wavs, lens)
        model.zero_grad(set_to_none=True)
        results[variant] = {"saved_bytes": nbytes, "saved_tensors": n,
                            "saved_bytes_per_audio_s": nbytes / a.seconds, "step_s": time.perf_counter() - t0}
    before, after = results["requires_grad_false"], results["freeze_feature_encoder"]
    cnn = before["saved_bytes"] - after["saved_bytes"]
    summary = {"shape": a.shape, "layers": a.layers, "seconds": a.seconds,
               "cnn_saved_bytes_per_audio_s": cnn / a.seconds, "after_over_before": after["saved_bytes"] / before["saved_bytes"],
               "results": results, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    mib = 2 ** 20
    for k, r in results.items():
        print(f"{k:24s} saved {r['saved_bytes'] / mib:9.1f} MiB in {r['saved_tensors']:4d} storages "
              f"= {r['saved_bytes_per_audio_s'] / mib:7.1f} MiB per audio-second")
    print(f"CNN activations no longer saved: {cnn / mib / a.seconds:.1f} MiB per audio-second "
          f"({cnn / a.seconds * 11 / 2 ** 30:.3f} GiB per 11 s utterance); after/before = {summary['after_over_before']:.3f} "
          f"with {a.layers} transformer layer(s)")
    out = Path(a.out or Path(__file__).parent / "logs" / f"cnn_freeze_{a.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
