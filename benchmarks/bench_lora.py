"""HarmoniFuse LM training: LoRA + bf16 vs full fine-tuning of the LM in fp32 (issues 14, 23): step time, peak memory.

    .venv/bin/python benchmarks/bench_lora.py [--lm base] [--steps 2 --warmup 1 --rounds 1] [--variants a,b]

Every variant runs in its own fresh process (``--child``, ``_common.run_child``), builds the same
:class:`lobes.harmonifuse.speech_lm.SpeechLM` on a random-init LLaMA-layout LM built from a config (``--lm``:
``small`` = hidden 256, 4 layers, 4 heads, FFN 1024, 20.7M parameters, batch 8; ``base`` = hidden 768, 12 layers,
12 heads, FFN 2048, 134M parameters, batch 4; both vocabulary 32,000 with an untied head) and runs AdamW steps
(zero_grad, forward, backward, step) on one batch of utterances x 4 s of speech (200 frames of a parameter-free
stand-in encoder, stacked by 4 to 50 LM positions), the prompt words of the ASR task (21 tokens) and a 100-token
target, i.e. ~172 LM positions. The LM attention is ``sdpa`` (the recipe default ``lm_attn_implementation``).
The encoder is parameter-free (fixed random hidden states) so that only the LM side differs between variants;
the speech adapter, encoder and LM fusion train in every variant, plus what ``lm_mode`` makes trainable. The
loss is chunked (``loss_chunk_size`` 256, the recipe default) in every variant; ``--loss-chunk 0`` builds all
target logits at once (the [B, N, 32000] logits then dominate every variant's memory).

Variants (ratios vs ``full_fp32``, measured in the same run):
  full_fp32        lm_mode full, LM weights fp32 (the reference, 1.00)
  lora_fp32        lm_mode lora (r 8, α 16, q/k/v/o), LM fp32
  lora_bf16        lora, LM weights bf16 (adapters and new parts fp32)
  lora_bf16_gc     lora, bf16, LM gradient checkpointing (the GPU profile, row gpu_llm_lora, on a CPU)
  frozen_bf16      lm_mode frozen, bf16 (context: no LM weight trains)
  frozen_bf16_gc   frozen, bf16, LM gradient checkpointing (active on a frozen LM: its input requires grad)
Memory: ``peak_rss`` = VmHWM of the measured steps (reset after the warm-up step, so AdamW state is in it);
``process_peak_rss`` = VmHWM over the whole process (imports, model build, warm-up and measured steps, never
reset); weights, gradients, AdamW state and activations all live in RSS on a CPU; "above import" subtracts what
``import torch, transformers, peft, lobes`` takes. Time = fastest measured step (see ``_common.aggregate``).
"""
import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {"full_fp32": ("full", "float32", False), "lora_fp32": ("lora", "float32", False),
            "lora_bf16": ("lora", "bfloat16", False), "lora_bf16_gc": ("lora", "bfloat16", True),
            "frozen_bf16": ("frozen", "bfloat16", False), "frozen_bf16_gc": ("frozen", "bfloat16", True)}
_LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False,
              attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# (LM config, batch): "base" is the >= 100M-parameter LM the 2-core, 24 GiB benchmark machine trains in minutes
LM_PRESETS = {"small": (dict(_LLAMA, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4), 8),
              "base": (dict(_LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=12), 4)}
LM, BATCH = LM_PRESETS["small"]
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so RSS would remember the
# largest step transient of any earlier step; a fixed 64 KiB threshold returns every large tensor to the OS on
# free, and RSS then follows the live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
LOSS_CHUNK = 256  # the recipe default; --loss-chunk 0 builds all target logits at once
FRAMES, ENC_DIM, ENC_LAYERS, TARGET_CHARS = 200, 256, 4, 100


def make_lm_dir(out, seed=0):
    """Random-init LM directory with the toolkit's char tokenizer (the 32k vocabulary is the LM's head size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lobes.harmonifuse.lm_loading import CharTokenizer

    out = Path(out)
    if not (out / "config.json").exists():
        torch.manual_seed(seed)
        cfg = dict(LM)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(out)
        CharTokenizer().save_pretrained(out)
    return out


class StandInEncoder:
    """Parameter-free "encoder": fixed random hidden states [L+1, B, T, D] (only the LM side is measured)."""
    num_layers, hidden_size = ENC_LAYERS, ENC_DIM

    def __init__(self):
        import torch
        self.hidden = torch.randn(ENC_LAYERS + 1, BATCH, FRAMES, ENC_DIM, generator=torch.Generator().manual_seed(1))

    def __call__(self, wavs, lens):
        import torch
        return self.hidden, torch.full((BATCH,), FRAMES, dtype=torch.long)


def state_bytes(model, opt):
    """Bytes of LM-side training state: weights + gradients + AdamW moments (exact, from the tensors)."""
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    g = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    o = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if hasattr(t, "numel"))
    return {"weights": w, "gradients": g, "adamw": o}


def child(variant, lm_dir, steps, warmup, loss_chunk, preset):
    import torch
    from peft import LoraConfig

    from lobes.harmonifuse.speech_lm import SpeechLM

    class Enc(torch.nn.Module):  # a Module wrapper so SpeechLM can register it
        num_layers, hidden_size = ENC_LAYERS, ENC_DIM

        def __init__(self):
            super().__init__()
            self.f = StandInEncoder()

        def forward(self, wavs, lens):
            return self.f(wavs, lens)

    global LOSS_CHUNK, LM, BATCH
    LOSS_CHUNK = loss_chunk or None
    LM, BATCH = LM_PRESETS[preset]
    mode, dtype, gc_on = VARIANTS[variant]
    C.set_threads()
    torch.manual_seed(0)
    gc.collect()
    rss_import = C.rss_bytes()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = SpeechLM(Enc(), {"source": str(lm_dir), "mode": mode, "peft_config": lora, "dtype": dtype,
                             "gradient_checkpointing": gc_on}, loss_chunk_size=LOSS_CHUNK).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ "
    targets = ["".join(letters[i] for i in torch.randint(0, 27, (TARGET_CHARS,), generator=g).tolist())
               for _ in range(BATCH)]
    wavs, lens = torch.zeros(BATCH, 1), torch.ones(BATCH)
    gc.collect()
    rss_built = C.rss_bytes()

    def step():
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(wavs, lens, "asr", targets).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0

    for _ in range(warmup):
        step()
    # After the warm-up: AdamW state exists (it stays resident, so it is in the peak), and the one-off lazy
    # imports and kernel set-up of a first step (~0.3 GiB, the same for every variant) are not counted as step.
    gc.collect()
    rss_warm = C.rss_bytes()
    process_peak = C.peak_rss_bytes()  # imports, build and warm-up (VmHWM was never reset before this)
    C.reset_peak_rss()
    load = os.getloadavg()[0]
    times = [step() for _ in range(steps)]
    peak = C.peak_rss_bytes()
    process_peak = max(process_peak, peak)
    C.emit({"variant": variant, "step_s": C.median([t[0] for t in times]),
            "cpu_s": C.median([t[4] for t in times]), "loadavg_1min": [load, os.getloadavg()[0]],
            "forward_s": C.median([t[1] for t in times]), "backward_s": C.median([t[2] for t in times]),
            "optimizer_s": C.median([t[3] for t in times]),
            "steps": [dict(zip(("step_s", "forward_s", "backward_s", "optimizer_s", "cpu_s"), t)) for t in times],
            "rss_import": rss_import, "rss_built": rss_built, "rss_warm": rss_warm, "peak_rss": peak,
            "process_peak_rss": process_peak,
            "state_bytes": state_bytes(model, opt),
            "trainable_backbone_params": sum(p.numel() for n, p in model.named_parameters()
                                             if p.requires_grad and n.startswith("lm.")),
            "lm_params": sum(p.numel() for p in model.lm.parameters())})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=list(VARIANTS))
    p.add_argument("--lm-dir")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK, help="loss_chunk_size of every variant (0: none)")
    p.add_argument("--lm", choices=list(LM_PRESETS), default="small", help="LM size and batch (module doc)")
    p.add_argument("--out", default=None, help="default: benchmarks/logs/lora.json (small), lora_base.json (base)")
    a = p.parse_args(argv)
    if a.child:
        return child(a.child, a.lm_dir, a.steps, a.warmup, a.loss_chunk, a.lm)
    global LM, BATCH
    LM, BATCH = LM_PRESETS[a.lm]
    a.out = a.out or str(Path(__file__).parent / "logs" / ("lora.json" if a.lm == "small" else f"lora_{a.lm}.json"))
    tmp = tempfile.mkdtemp(prefix="bench_lora_")
    try:
        lm_dir = make_lm_dir(Path(tmp) / "lm")
        t_start = time.time()
        variants = a.variants.split(",")
        runs = {v: [] for v in variants}
        for rnd in range(a.rounds):
            for v in variants:
                r = C.run_child(Path(__file__), ["--child", v, "--lm-dir", lm_dir, "--steps", a.steps,
                                                 "--warmup", a.warmup, "--loss-chunk", a.loss_chunk, "--lm", a.lm],
                                 env=MALLOC_ENV)
                runs[v].append(r)
                print(f"  round {rnd} {v:13s} {r['step_s']:6.2f} s/step  peak RSS {C.gib(r['peak_rss']):.3f} GiB  "
                      f"above import {C.gib(r['peak_rss'] - r['rss_import']):.3f} GiB  "
                      f"process peak {C.gib(r['process_peak_rss']):.3f} GiB  "
                      f"built {C.gib(r['rss_built'] - r['rss_import']):.3f} "
                      f"warm {C.gib(r['rss_warm'] - r['rss_import']):.3f} GiB  "
                      f"load {[round(x, 1) for x in r['loadavg_1min']]}", flush=True)
        results = {v: C.aggregate(rs) for v, rs in runs.items()}
        for v, r in results.items():
            r["lm_params"] = runs[v][0]["lm_params"]
            r["process_peak_rss"] = sum(x["process_peak_rss"] for x in runs[v]) / len(runs[v])
        C.add_ratios(results, "full_fp32")
        for v, r in results.items():
            r["process_peak_ratio"] = r["process_peak_rss"] / results["full_fp32"]["process_peak_rss"]
            print(f"{v:24s} whole-process peak {C.gib(r['process_peak_rss']):6.2f} GiB  x {r['process_peak_ratio']:.3f}")
        C.print_table(results)
        C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "steps": a.steps,
                            "warmup": a.warmup, "rounds": a.rounds, "lm": a.lm, "lm_config": LM, "batch": BATCH,
                            "loss_chunk_size": a.loss_chunk or None,
                            "results": results, "runs": runs, "wall_s": time.time() - t_start})
        print(f"\nwall {time.time() - t_start:.0f} s; written {a.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
