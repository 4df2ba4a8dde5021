"""Planner prediction (tools/plan_memory, meta device, no compute) of the λ step's peak memory at WavLM-Large shape:
merge_impl lowrank at r ∈ {8, 32, 128} vs full fine-tuning and vs the default materialized merge (issue 24).

    .venv/bin/python benchmarks/bench_lowrank_plan.py [--batch 8 --seconds 11] [--out benchmarks/logs/lowrank_plan.json]

The same training steps as ``plan_memory.train_steps`` (forward, soft CE, backward, AdamW) on meta tensors of
each configuration: full fine-tuning = ``WavLMEncoder(freeze=False)`` (CNN frozen, as the SER recipe); the merges
= ``MergedWavLM`` with 2 task vectors, layer-wise λ; lowrank with rank-r meta factors for every matrix. Peak =
model storages + the step's live peak + the largest tensor (kernel temporaries), as ``plan_memory.predict``.
"""
import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _meta_factored(state, rank):
    import torch
    from lobes.adaltm.low_rank import FactoredVector, is_matrix

    factors = {k: (torch.empty(v.shape[0], rank, device="meta"), torch.empty(v[0].numel(), rank, device="meta"))
               for k, v in state.items() if is_matrix(v)}
    dense = {k: torch.empty_like(v) for k, v in state.items() if k not in factors}
    return FactoredVector("tv", dense, factors, {k: tuple(state[k].shape) for k in factors})


def modules_for(variant, cfg):
    import torch
    from transformers import WavLMModel

    import lobes.adaltm.merged_wavlm as mw
    import lobes.wavlm_encoder as we
    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum
    from tools import plan_memory as pm

    with torch.device("meta"):
        if variant in ("materialized", "fused"):
            return pm.build_adaltm(cfg, 2, merge_impl=variant)
        base = WavLMModel(cfg)
        if variant == "ft_cnn_frozen":
            with mock.patch.object(we, "load_wavlm", lambda *a, **k: base):
                enc = we.WavLMEncoder("<meta large>", freeze=False, freeze_feature_extractor=True).train()
        else:
            rank = int(variant.split("_r")[1])
            vectors = {f"tv{i}": _meta_factored(base.state_dict(), rank) for i in range(2)}
            with mock.patch.object(mw, "load_wavlm", lambda *a, **k: base), pm._meta_safe():
                enc = mw.MergedWavLM("<meta large>", vectors, merge_impl="lowrank", delta_rank=rank)
        return enc, WeightedLayerSum(cfg.num_hidden_layers), SERHead(cfg.hidden_size, 256)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=11.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "lowrank_plan.json"))
    a = p.parse_args(argv)
    from tools import plan_memory as pm

    cfg = pm.wavlm_config("large")
    rows = {}
    for variant in ("ft_cnn_frozen", "materialized", "fused", "lowrank_r8", "lowrank_r32", "lowrank_r128"):
        modules = modules_for(variant, cfg)
        run = pm.train_steps(modules, a.batch, a.seconds, a.precision)
        model = pm.model_bytes(modules)[0]
        rows[variant] = {"model": model, **{k: run[k] for k in ("dynamic_peak", "saved_for_backward", "largest")},
                         "peak": model + run["dynamic_peak"] + run["largest"]}
        del modules
    ref = rows["ft_cnn_frozen"]["peak"]
    print(f"WavLM-Large, {a.batch} x {a.seconds:g} s, {a.precision}: predicted peak GiB (x full fine-tuning)")
    for v, r in rows.items():
        r["x_ft"] = r["peak"] / ref
        print(f"  {v:15s} model {C.gib(r['model']):6.2f}  saved {C.gib(r['saved_for_backward']):6.2f}  "
              f"peak {C.gib(r['peak']):6.2f}  x{r['x_ft']:.2f}")
    C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "batch": a.batch,
                        "seconds": a.seconds, "precision": a.precision, "results": rows})


if __name__ == "__main__":
    main()
