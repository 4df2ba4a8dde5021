"""Inference throughput of the folded export vs a plain HF WavLMModel of the same config (issue 8, target 3).

    .venv/bin/python benchmarks/bench_folded_inference.py [--rounds 8] [--out benchmarks/logs/folded_inference.json]

WavLM-Base-shaped random-init base + 2 random task vectors merged with per-group λ; ``export_folded`` writes
the folded model, which is read back with ``WavLMModel.from_pretrained`` (what a user of the export does).
Models, all in eval mode under ``torch.inference_mode`` and timed through ``lobes.wavlm_encoder.run_wavlm``
(all hidden states, as the SER head consumes them), batch 4 x 4 s, 2 threads:
  plain        WavLMModel of the same config (the reference, 1.00)
  folded       the exported folded model
  plain_frozen_unfolded  the plain model with requires_grad=False called directly, i.e. without
               lobes.wavlm_encoder's _foldable_weights (context: torch.matmul's bmm path for frozen weights)
  merged_*     MergedWavLM with fixed λ (functional / fused re-merge every group on every call; materialized
               runs on its stored merged weights)
Rounds alternate the models, rotating their order each round, so drift in machine load hits all alike;
per model the fastest batch (load from other processes only adds time) and the median are reported;
throughput = audio seconds / wall second.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BATCH, SECONDS, SR = 4, 4.0, 16000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--model-dir", help="existing WavLM dir (default: a random-init WavLM-Base in a temp dir)")
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "folded_inference.json"))
    a = p.parse_args(argv)

    import torch
    from transformers import WavLMModel

    from lobes.adaltm.fold_export import export_folded
    from lobes.adaltm.merged_wavlm import MergedWavLM
    from lobes.wavlm_encoder import run_wavlm

    C.set_threads()
    tmp = Path(tempfile.mkdtemp(prefix="bench_folded_"))
    try:
        t_start = time.time()
        model_dir = a.model_dir or C.make_model_dir(tmp / "wavlm_base")
        plain = WavLMModel.from_pretrained(model_dir).eval()
        g = torch.Generator().manual_seed(1)
        deltas = [{k: 0.01 * torch.randn(v.shape, generator=g) for k, v in plain.state_dict().items()}
                  for _ in range(2)]
        merged = {}
        for impl in ("functional", "fused", "materialized"):
            m = MergedWavLM(model_dir, {"ASR": deltas[0], "SER": deltas[1]}, lambda_mode="fixed", merge_impl=impl)
            with torch.no_grad():
                m.lambdas.lam.copy_(torch.linspace(0.1, 0.9, m.lambdas.lam.numel()).view(m.lambdas.lam.shape))
            merged[f"merged_{impl}"] = m.eval()
        del deltas
        out = export_folded(merged["merged_functional"], tmp / "folded")
        folded = WavLMModel.from_pretrained(out).eval()
        volatile = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
        same = [{k: v for k, v in mm.config.to_dict().items() if k not in volatile} for mm in (plain, folded)]
        assert type(folded) is type(plain) and same[0] == same[1], "folded export must be the same class/config"

        wavs = torch.randn(BATCH, int(SECONDS * SR), generator=torch.Generator().manual_seed(0))
        lens = torch.ones(BATCH)
        # context: a frozen copy called directly (without run_wavlm's _foldable_weights): matmul's bmm path
        frozen = WavLMModel.from_pretrained(model_dir).eval().requires_grad_(False)
        mask = torch.ones(BATCH, int(SECONDS * SR), dtype=torch.long)
        models = {"plain": plain, "folded": folded, **merged, "plain_frozen_unfolded": frozen}
        with torch.inference_mode():
            ref = merged["merged_functional"](wavs, lens)[0]
            got = run_wavlm(folded, wavs, lens)[0]
            max_diff = (ref - got).abs().max().item()
            times = {name: [] for name in models}
            names = list(models)
            for r in range(a.rounds + 1):  # first round = warm-up, discarded
                for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no fixed position
                    model = models[name]
                    fn = model if name.startswith("merged") else (lambda w, l, mm=model: run_wavlm(mm, w, l))
                    if name == "plain_frozen_unfolded":
                        fn = (lambda w, l, mm=model: mm(w, attention_mask=mask, output_hidden_states=True))
                    t0 = time.perf_counter()
                    fn(wavs, lens)
                    times[name].append(time.perf_counter() - t0)
        res = {}
        for name, ts in times.items():
            best, med = min(ts[1:]), C.median(ts[1:])
            res[name] = {"s_per_batch": best, "audio_s_per_s": BATCH * SECONDS / best, "median_s_per_batch": med,
                         "all_s": ts[1:]}
        for name in res:
            res[name]["throughput_ratio"] = res[name]["audio_s_per_s"] / res["plain"]["audio_s_per_s"]
            res[name]["median_throughput_ratio"] = res["plain"]["median_s_per_batch"] / res[name]["median_s_per_batch"]
        print(f"batch {BATCH} x {SECONDS:.0f} s, {a.rounds} rounds; folded vs merged max |Δh| = {max_diff:.2e}")
        print(f"{'model':18s} {'best s':>7s} {'audio s/s':>9s} {'x plain':>8s} {'median s':>9s} {'x plain':>8s}")
        for name, r in res.items():
            print(f"{name:18s} {r['s_per_batch']:7.3f} {r['audio_s_per_s']:9.2f} {r['throughput_ratio']:8.3f} "
                  f"{r['median_s_per_batch']:9.3f} {r['median_throughput_ratio']:8.3f}")
        C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "batch": [BATCH, SECONDS],
                            "rounds": a.rounds,
                            "folded_vs_merged_max_abs_diff": max_diff, "results": res,
                            "wall_s": time.time() - t_start})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
