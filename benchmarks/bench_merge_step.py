"""λ-training step vs full fine-tuning (issue 8, target 1): step time and peak memory, side by side, as ratios.

    .venv/bin/python benchmarks/bench_merge_step.py [--steps 3 --warmup 1 --rounds 2] [--out benchmarks/logs/merge_step.json]
    .venv/bin/python benchmarks/bench_merge_step.py --profile fused     # torch.profiler top ops of one variant

Every variant runs in its own fresh process (``--child``) on the same WavLM-Base-shaped random-init model
(see ``_common.base_config``), batch 2 x 4 s of random audio, 2 threads, and the same downstream (α weighted
layer sum + SER head + cross-entropy; AdamW). A step = zero_grad, forward, backward, optimizer step.

Variants (λ: 2 task vectors x 13 groups for a 12-layer model):
  ft_all          (a) full fine-tuning, AdamW over all 94.4M backbone weights (the reference, 1.00)
  ft_cnn_frozen       full fine-tuning with the CNN frozen (what the SER/ASR/MTL recipes do) - context
  naive           (b) AdaMerging-style: all merged weights materialised, one functional_call of the model
  functional      (c) MergedWavLM(merge_impl="functional"): per-group merge + functional_call
  functional_gc   (c) ... with gradient_checkpointing=True
  fused           (e) MergedWavLM(merge_impl="fused"): lobes.adaltm.merged_linear (merge node + rebuild in backward)
  fused_bf16      (e) ... with ΔW stored in bf16 (delta_dtype=torch.bfloat16)
  fused_gc            fused + gradient_checkpointing
  fused_gc_bf16       fused + gradient_checkpointing + bf16 ΔW
  materialized    (f) MergedWavLM(merge_impl="materialized", the default): stored weights = merge for the
                      current λ, recomputed from a kept W_base once per step; λ gradient reduced from dL/dW
                      (no merge in forward, no rebuild in backward)
  materialized_bf16   ... with ΔW stored in bf16
  materialized_gc     ... + gradient_checkpointing
  materialized_gc_bf16 ... + gradient_checkpointing + bf16 ΔW
  *_cnngc         gradient_checkpointing="cnn": only the CNN feature extractor is recomputed in backward
  frozen          (d) frozen backbone under no_grad + α + head
  lowrank_r8 / _r32 / _r128 / _e0.9   MergedWavLM(merge_impl="lowrank", delta_rank=8 / 32 / 128 / 0.9): task
                      vectors as factors U Vᵀ, no dW GEMM (issue 24). Their vectors have a synthetic spectrum
                      σ_i ∝ i^-0.75 per matrix (``synthetic_factored``): time and memory depend on the rank only,
                      and energy 0.9 of that spectrum keeps ~10% of each matrix's rank (printed per run).
                      (``_cnngc`` / ``_gc`` suffixes: checkpointing, as for the other variants)
``bf16_error`` (not a training variant) measures what bf16 ΔW does to the merged weights and hidden states.
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

VARIANTS = ["ft_all", "ft_cnn_frozen", "naive", "functional", "functional_gc", "fused", "fused_bf16", "fused_gc",
            "fused_gc_bf16", "materialized", "materialized_bf16", "materialized_gc", "materialized_gc_bf16", "frozen"]
NUM_VECTORS = 2
BATCH, SECONDS, SR = 2, 4.0, 16000
DELTA_STD = 0.01  # task-vector entries ~ N(0, 0.01²): half the init std of the weights (0.02)


def random_task_vectors(state, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{k: DELTA_STD * torch.randn(v.shape, generator=g) for k, v in state.items()}
            for _ in range(NUM_VECTORS)]


SPECTRUM_POWER = 0.75


def synthetic_factored(state, spec, seed):
    """A FactoredVector at ``spec`` of a task vector whose matrices have singular values σ_i ∝ i^-0.75, scaled to
    the Frobenius norm of the Gaussian vectors above (no SVD: the factors are drawn at the kept rank)."""
    import torch
    from lobes.adaltm.low_rank import FactoredVector, is_matrix, rank_for

    g = torch.Generator().manual_seed(seed)
    dense, factors, shapes = {}, {}, {}
    for k, v in state.items():
        if not is_matrix(v):
            dense[k] = DELTA_STD * torch.randn(v.shape, generator=g)
            continue
        out, inner = v.shape[0], v[0].numel()
        sigma = torch.arange(1, min(out, inner) + 1, dtype=torch.float64).pow(-SPECTRUM_POWER)
        sigma *= DELTA_STD * (out * inner) ** 0.5 / float(sigma.norm())
        r = rank_for(sigma, spec)
        u = torch.randn(out, r, generator=g) / out ** 0.5 * sigma[:r].float()
        factors[k], shapes[k] = (u, torch.randn(inner, r, generator=g) / inner ** 0.5), tuple(v.shape)
    return FactoredVector(name=f"tv{seed}", dense=dense, factors=factors, shapes=shapes)


def task_vector_files(model_dir, out_dir=None):
    """The random task vectors as safetensors files in ``out_dir`` (default: beside the model); written once."""
    from lobes.adaltm.task_vector import TaskVector, save_task_vector
    from lobes.wavlm_encoder import load_wavlm

    paths = [Path(out_dir or model_dir) / f"task_vector_{i}.safetensors" for i in range(NUM_VECTORS)]
    if not all(p.exists() for p in paths):
        state = {k: v for k, v in load_wavlm(model_dir).state_dict().items() if v.is_floating_point()}
        for i, (p, d) in enumerate(zip(paths, random_task_vectors(state))):
            save_task_vector(TaskVector(name=f"tv{i}", delta=d), p)
    return paths


class NaiveAdaMerging:
    """What a user would write from the AdaMerging recipe: build every merged weight of the model, then one
    ``functional_call`` of the whole model with them (all merged weights alive from the start of the step)."""

    def __init__(self, model, deltas):
        import torch
        from lobes.adaltm import layer_groups

        self.model = model.requires_grad_(False).eval()
        cfg = model.config
        self.base = dict(model.named_parameters())
        self.deltas = deltas
        self.group = {k: layer_groups.group_of(k, cfg.num_hidden_layers, cfg.do_stable_layer_norm)
                      for k in self.base}
        self.lam = torch.nn.Parameter(torch.full((len(deltas), layer_groups.num_groups(cfg.num_hidden_layers)), 0.5))

    def __call__(self, wavs, wav_lens):
        from torch.func import functional_call
        from lobes.wavlm_encoder import run_wavlm

        merged = {}
        for k, w in self.base.items():
            for i, d in enumerate(self.deltas):
                w = w + self.lam[i, self.group[k]] * d[k]
            merged[k] = w
        model = self.model

        class _Merged:  # run_wavlm needs a callable with the model's length arithmetic
            _get_feat_extract_output_lengths = staticmethod(model._get_feat_extract_output_lengths)

            def __call__(self, *a, **kw):
                return functional_call(model, merged, a, kw)

        return run_wavlm(_Merged(), wavs, wav_lens)


def build(variant, model_dir, vector_dir=None):
    """-> (encoder callable (wavs, lens) -> (hidden, mask), trainable backbone parameters)."""
    import torch
    from lobes.adaltm.merged_wavlm import MergedWavLM
    from lobes.wavlm_encoder import WavLMEncoder, load_wavlm

    if variant.startswith(("ft_all", "ft_cnn_frozen")):  # "_gc" suffix: HF gradient checkpointing (bench_amp)
        enc = WavLMEncoder(model_dir, freeze=False, freeze_feature_extractor=variant.startswith("ft_cnn_frozen"),
                           gradient_checkpointing=variant.endswith("_gc"))
        enc.train()
        return enc, [p for p in enc.parameters() if p.requires_grad]
    if variant == "frozen":
        enc = WavLMEncoder(model_dir, freeze=True)
        return enc, []
    if variant.startswith("lowrank_"):
        tag = variant.split("_")[1]
        spec = int(tag[1:]) if tag[0] == "r" else float(tag[1:])
        state = {k: v for k, v in load_wavlm(model_dir).state_dict().items() if v.is_floating_point()}
        vectors = {f"tv{i}": synthetic_factored(state, spec, seed=i + 1) for i in range(NUM_VECTORS)}
        del state
        enc = MergedWavLM(model_dir, vectors, lambda_mode="layerwise", merge_impl="lowrank", delta_rank=spec,
                          gradient_checkpointing="cnn" if "_cnngc" in variant else "_gc" in variant)
        del vectors
        enc.train()
        return enc, [enc.lambdas.lam]
    paths = task_vector_files(model_dir, vector_dir)
    if variant == "naive":
        from lobes.adaltm.task_vector import load_task_vector

        enc = NaiveAdaMerging(load_wavlm(model_dir), [load_task_vector(p).delta for p in paths])
        return enc, [enc.lam]
    impl = variant.split("_")[0]  # functional | fused | materialized
    # from files, as the recipe loads them (what the loader frees counts against the variant, as for a user)
    enc = MergedWavLM(model_dir, {f"tv{i}": p for i, p in enumerate(paths)}, lambda_mode="layerwise",
                      merge_impl=impl, gradient_checkpointing="cnn" if "_cnngc" in variant else "_gc" in variant,
                      delta_dtype=torch.bfloat16 if "_bf16" in variant else None)
    enc.train()
    return enc, [enc.lambdas.lam]


def _head_optimizer_batch(model_dir, backbone_params):
    """What every measured step trains beside the backbone, and its batch: (α, SER head, AdamW over backbone + α +
    head, wavs, lens, labels), built after the backbone (the same RNG draws in every child)."""
    import torch
    from transformers import WavLMConfig

    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    cfg = WavLMConfig.from_pretrained(model_dir)
    ws, head = WeightedLayerSum(cfg.num_hidden_layers), SERHead(cfg.hidden_size, 256, num_classes=8, dropout=0.0)
    opt = torch.optim.AdamW(backbone_params + list(ws.parameters()) + list(head.parameters()), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    wavs = torch.randn(BATCH, int(SECONDS * SR), generator=g)
    labels = torch.randint(0, 8, (BATCH,), generator=g)
    return ws, head, opt, wavs, torch.ones(BATCH), labels


def child(variant, model_dir, steps, warmup, profile=False, precision="fp32", vector_dir=None):
    import torch

    C.set_threads()
    torch.manual_seed(0)
    gc.collect()
    rss_import = C.rss_bytes()
    enc, backbone_params = build(variant, model_dir, vector_dir)
    ws, head, opt, wavs, lens, labels = _head_optimizer_batch(model_dir, backbone_params)
    gc.collect()
    rss_built = C.rss_bytes()
    C.reset_peak_rss()

    def step():
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden, mask = enc(wavs, lens)
            loss = torch.nn.functional.cross_entropy(head(ws(hidden), mask).float(), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0

    for _ in range(warmup):
        step()
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            times = [step() for _ in range(steps)]
        ka = p.key_averages()
        total = sum(e.self_cpu_time_total for e in ka)
        top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:18]
        C.emit({"variant": variant, "step_s": C.median([t[0] for t in times]),
                "total_self_cpu_s": total / 1e6 / steps,
                "top": [{"op": e.key, "self_cpu_s_per_step": e.self_cpu_time_total / 1e6 / steps,
                         "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in top]})
        return
    load = os.getloadavg()[0]
    times = [step() for _ in range(steps)]
    peak = C.peak_rss_bytes()
    C.emit({"variant": variant, "precision": precision, "step_s": C.median([t[0] for t in times]),
            "cpu_s": C.median([t[4] for t in times]), "loadavg_1min": [load, os.getloadavg()[0]],
            "forward_s": C.median([t[1] for t in times]), "backward_s": C.median([t[2] for t in times]),
            "optimizer_s": C.median([t[3] for t in times]), "all_steps_s": [t[0] for t in times],
            "steps": [dict(zip(("step_s", "forward_s", "backward_s", "optimizer_s", "cpu_s"), t)) for t in times],
            "rss_import": rss_import, "rss_built": rss_built, "peak_rss": peak,
            "trainable_backbone_params": sum(p.numel() for p in backbone_params),
            "lowrank_ranks": sorted({r for rs in getattr(enc, "lowrank_ranks", {}).values() for r in rs})})


def _group_modules(enc):
    """(name, module) of the merge groups of a built variant's WavLM (wrapped or not)."""
    wavlm = enc.model
    mods = [("CNN", wavlm.feature_extractor), ("feature_projection", wavlm.feature_projection),
            ("pos_conv", wavlm.encoder.pos_conv_embed)]
    return mods + [(f"layer{i + 1}", layer) for i, layer in enumerate(wavlm.encoder.layers)]


def saved_activations(model_dir, variant="ft_all", vector_dir=None):
    """Bytes autograd saves for backward during one training forward of ``variant``, per merge group (unique
    storages, parameters and buffers excluded; custom Functions' ``save_for_backward`` included), and the 12
    largest (group kind, shape, dtype) classes of saved tensors."""
    import torch

    C.set_threads()
    enc, _ = build(variant, model_dir, vector_dir)
    params = {t.untyped_storage().data_ptr() for t in list(enc.parameters()) + list(enc.buffers())}
    current, seen, per_group, per_shape = ["other"], set(), {}, {}
    for name, mod in _group_modules(enc):
        mod.register_forward_pre_hook(lambda m, a, name=name: current.__setitem__(0, name))
        mod.register_forward_hook(lambda m, a, o: current.__setitem__(0, "other"))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            n = t.untyped_storage().nbytes()
            per_group[current[0]] = per_group.get(current[0], 0) + n
            kind = "layer" if current[0].startswith("layer") else current[0]
            key = f"{kind} {list(t.shape)} {str(t.dtype)[6:]}"
            per_shape[key] = per_shape.get(key, 0) + n
        return t

    wavs = torch.randn(BATCH, int(SECONDS * SR), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, _ = enc(wavs, torch.ones(BATCH))
    layers = sum(v for k, v in per_group.items() if k.startswith("layer"))
    top = sorted(per_shape.items(), key=lambda kv: -kv[1])[:12]
    C.emit({"variant": variant, "per_group_bytes": per_group, "total_bytes": sum(per_group.values()),
            "transformer_layers_bytes": layers, "num_layers": len(enc.model.encoder.layers), "top_shapes": top})


def memory_timeline(model_dir, variant, vector_dir=None):
    """Live tensor bytes through one training step (after one warm-up step), from torch.profiler's CPU
    allocator events: the peak above the step's start, the phase it falls in (forward / backward / optimizer),
    the op running at that moment, each phase's own peak, the peak once the CNN's backward has begun, and the
    blocks of >= 4 MiB alive at both peaks with the op that allocated them. Run outside the comparison:
    ``--child memory_timeline:lowrank_r32 --model-dir DIR``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    C.set_threads()
    torch.manual_seed(0)
    enc, backbone_params = build(variant, model_dir, vector_dir)
    ws, head, opt, wavs, lens, labels = _head_optimizer_batch(model_dir, backbone_params)

    def step():
        opt.zero_grad(set_to_none=True)
        with record_function("phase:forward"):
            hidden, mask = enc(wavs, lens)
            loss = torch.nn.functional.cross_entropy(head(ws(hidden), mask), labels)
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            opt.step()

    # the CNN's backward begins when its output's gradient arrives: a marker allocation of a unique size then
    marker, kept = 777_777, []

    def mark_cnn_backward(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: kept.append(torch.empty(marker, dtype=torch.uint8)))
    enc.model.feature_extractor.register_forward_hook(mark_cnn_backward)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs, phases, stack = [], {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.name.startswith("phase:"):
            phases[node.name[6:]] = (node.start_time_ns, node.end_time_ns)
        elif node.name == "[memory]":
            allocs.append((node.start_time_ns, node.typed[1].alloc_size, node))
    allocs.sort(key=lambda a: a[0])

    def phase_of(t):
        return next((k for k, (t0, t1) in phases.items() if t0 <= t <= t1), "other")

    def chain(node, depth):
        names = []
        while node is not None and len(names) < depth:
            names.append(node.name.replace("autograd::engine::evaluate_function: ", ""))
            node = node.parent
        return " < ".join(names)

    cnn_bwd = next((t for t, size, _ in allocs if size == marker), float("inf"))
    live, peaks, alive, big = 0, {"step": 0, "cnn_backward": 0}, {}, {}
    at_peak, phase_peak = {}, {}
    for t, size, node in allocs:
        live += size
        if size > 0:
            alive[node.typed[1].ptr] = (size, node)
        else:
            alive.pop(node.typed[1].ptr, None)
        ph = phase_of(t)
        phase_peak[ph] = max(phase_peak.get(ph, 0), live)
        for name in ("step", "cnn_backward") if t >= cnn_bwd else ("step",):
            if live > peaks[name]:
                peaks[name], at_peak[name] = live, (t, node)
                big[name] = [(sz, n) for sz, n in alive.values() if sz >= 4 * 2 ** 20]
    blocks = {}
    for name, items in big.items():  # blocks of >= 4 MiB alive at each peak, by size and allocating op
        rows = {}
        for sz, n in items:
            key = f"{sz / 2 ** 20:.1f} MiB  {chain(n.parent, 6)}"
            rows[key] = rows.get(key, 0) + 1
        blocks[name] = sorted(rows.items(), key=lambda kv: -float(kv[0].split()[0]) * kv[1])
    C.emit({"variant": variant, "peak_live_bytes": peaks["step"], "cnn_backward_peak_live_bytes": peaks["cnn_backward"],
            "end_live_bytes": live, "phase_peak_bytes": phase_peak, "peak_phase": phase_of(at_peak["step"][0]),
            "ops_at_peak": chain(at_peak["step"][1].parent, 5), "blocks_at_peaks": blocks})


def rss_timeline(model_dir, variant, vector_dir=None):
    """Resident size through one training step (after one warm-up step), sampled every 2 ms by a thread, with a
    mark where each merge group's forward and backward begins: {segment: [RSS at its start, max RSS in it]} in
    bytes above the RSS before the step. Run with ``MALLOC_MMAP_THRESHOLD_`` low (``--mmap-threshold``) so
    that RSS follows what is alive (tensors and any library scratch memory outside torch's allocator)."""
    import threading

    import torch

    C.set_threads()
    torch.manual_seed(0)
    enc, backbone_params = build(variant, model_dir, vector_dir)
    ws, head, opt, wavs, lens, labels = _head_optimizer_batch(model_dir, backbone_params)
    marks, samples, stop = [], [], threading.Event()

    def mark(name):
        marks.append((time.perf_counter(), name))

    def out_hook(m, a, o, name):
        t = o[0] if isinstance(o, tuple) else o
        if t.requires_grad:
            t.register_hook(lambda grad: mark(f"bwd {name}"))
    for name, mod in _group_modules(enc):
        mod.register_forward_pre_hook(lambda m, a, name=name: mark(f"fwd {name}"))
        mod.register_forward_hook(lambda m, a, o, name=name: out_hook(m, a, o, name))

    def step():
        opt.zero_grad(set_to_none=True)
        mark("fwd start")
        hidden, mask = enc(wavs, lens)
        loss = torch.nn.functional.cross_entropy(head(ws(hidden), mask), labels)
        mark("bwd start")
        loss.backward()
        mark("optimizer")
        opt.step()
        mark("end")

    def sampler():
        while not stop.is_set():
            samples.append((time.perf_counter(), C.rss_bytes()))
            time.sleep(0.002)
    step()
    gc.collect()
    marks.clear()
    base = C.rss_bytes()
    th = threading.Thread(target=sampler)
    th.start()
    step()
    stop.set()
    th.join()
    segs = {}
    for i, (t0, name) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else t0
        inside = [r for t, r in samples if t0 <= t <= t1] or [C.rss_bytes()]
        segs[name] = [inside[0] - base, max(inside) - base]
    peak = max(r for _, r in samples)
    C.emit({"variant": variant, "rss_before_step": base, "peak_above_before": peak - base, "segments": segs})


def bf16_error(model_dir):
    """Max |merged(ΔW fp32) - merged(ΔW bf16)| over all weights at λ = 0.5 (init) and λ = 1, and the effect on
    the hidden states of the merged model."""
    import torch
    from lobes.adaltm.merged_wavlm import MergedWavLM
    from lobes.wavlm_encoder import load_wavlm

    C.set_threads()
    state = load_wavlm(model_dir).state_dict()
    deltas = random_task_vectors(state)
    out = {}
    for lam in (0.5, 1.0):
        max_abs = max_rel = 0.0
        num = den = 0.0
        for k, w in state.items():
            exact = w + lam * deltas[0][k] + lam * deltas[1][k]
            approx = w + lam * deltas[0][k].bfloat16().float() + lam * deltas[1][k].bfloat16().float()
            err = (exact - approx).abs()
            max_abs = max(max_abs, err.max().item())
            max_rel = max(max_rel, (err / (lam * (deltas[0][k].abs() + deltas[1][k].abs())).clamp_min(1e-12)).max().item())
            num += err.pow(2).sum().item()
            den += (exact - w).pow(2).sum().item()
        out[f"lambda_{lam}"] = {"max_abs_error": max_abs, "max_error_rel_to_lambda_dW": max_rel,
                                "rel_frobenius_error_of_merge_update": (num / den) ** 0.5,
                                "max_abs_merged_weight": max(v.abs().max().item() for v in state.values())}
    g = torch.Generator().manual_seed(0)
    wavs = torch.randn(BATCH, int(SECONDS * SR), generator=g)
    hs = {}
    for name, dt in (("fp32", None), ("bf16", torch.bfloat16)):
        m = MergedWavLM(model_dir, {"tv0": deltas[0], "tv1": deltas[1]}, lambda_mode="fixed", delta_dtype=dt)
        with torch.no_grad():
            hs[name] = m(wavs, torch.ones(BATCH))[0]
        del m
    diff = (hs["fp32"] - hs["bf16"]).abs()
    out["hidden_states"] = {"max_abs_diff": diff.max().item(),
                            "max_abs_diff_last_layer": diff[-1].max().item(),
                            "rms_last_layer": hs["fp32"][-1].pow(2).mean().sqrt().item()}
    C.emit(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help="existing WavLM dir (default: a random-init WavLM-Base in a temp dir)")
    p.add_argument("--vector-dir", help=argparse.SUPPRESS)  # where the parent wrote the task vector files
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = CPU autocast (bench_amp)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=2, help="round-robin repeats; the quietest round counts")
    p.add_argument("--mmap-threshold", type=int, help="MALLOC_MMAP_THRESHOLD_ for the children: glibc returns "
                   "every larger block to the OS on free, so peak RSS tracks live tensors (slower steps)")
    p.add_argument("--profile", help="profile this variant with torch.profiler instead of the comparison")
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "merge_step.json"))
    a = p.parse_args(argv)
    if a.child:
        if a.child == "bf16_error":
            return bf16_error(a.model_dir)
        name, _, mode = a.child.partition(":")
        if name == "saved_activations":
            return saved_activations(a.model_dir, mode or "ft_all", a.vector_dir)
        if name == "rss_timeline":
            return rss_timeline(a.model_dir, mode, a.vector_dir)
        if name == "memory_timeline":
            return memory_timeline(a.model_dir, mode, a.vector_dir)
        return child(name, a.model_dir, a.steps, a.warmup, profile=mode == "profile", precision=a.precision,
                     vector_dir=a.vector_dir)

    C.set_threads()
    tmp = None
    model_dir = a.model_dir
    if model_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_wavlm_base_")
        model_dir = C.make_model_dir(Path(tmp) / "wavlm_base")
    vector_dir = tempfile.mkdtemp(prefix="bench_task_vectors_")
    try:
        t_start = time.time()
        task_vector_files(model_dir, vector_dir)
        if a.profile:
            r = C.run_child(__file__, ["--child", a.profile + ":profile", "--model-dir", model_dir,
                                       "--vector-dir", vector_dir, "--steps", a.steps, "--warmup", a.warmup])
            print(f"profile of '{a.profile}': {r['step_s']:.2f} s/step under the profiler, "
                  f"{r['total_self_cpu_s']:.2f} s of op self time per step")
            print(f"{'op':40s} {'s/step':>8s} {'share':>7s} {'calls':>7s}")
            for e in r["top"]:
                print(f"{e['op'][:40]:40s} {e['self_cpu_s_per_step']:8.3f} {100 * e['share']:6.1f}% "
                      f"{e['calls_per_step']:7.0f}")
            C.save_json(Path(a.out).with_name(f"profile_{a.profile}.json"), {"machine": C.machine_info(), **r})
            return
        variants = a.variants.split(",")
        env = {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold else None
        runs = {v: [] for v in variants}
        for rnd in range(a.rounds):  # round-robin, so a burst of load from elsewhere hits one round of each
            for v in variants:
                r = C.run_child(__file__, ["--child", v, "--model-dir", model_dir, "--vector-dir", vector_dir,
                                           "--steps", a.steps,
                                           "--warmup", a.warmup], env=env)
                runs[v].append(r)
                print(f"  round {rnd} {v:15s} {r['step_s']:6.2f} s/step ({r['cpu_s']:.2f} s CPU)  peak RSS "
                      f"{C.gib(r['peak_rss']):5.2f} GiB  load {[round(x, 1) for x in r['loadavg_1min']]}", flush=True)
        bf16 = C.run_child(__file__, ["--child", "bf16_error", "--model-dir", model_dir])
        acts = C.run_child(__file__, ["--child", "saved_activations", "--model-dir", model_dir])
        acts_lowrank = {v: C.run_child(__file__, ["--child", f"saved_activations:{v}", "--model-dir", model_dir])
                        for v in variants if v == "lowrank_r32"}
        results = {v: C.aggregate(rs) for v, rs in runs.items()}
        C.add_ratios(results, "ft_all")
        C.print_table(results)
        print("\nbf16 ΔW vs fp32 ΔW:", bf16)
        print(f"activations saved for backward (fine-tuning forward): {C.gib(acts['total_bytes']):.3f} GiB, of which "
              f"CNN {C.gib(acts['per_group_bytes'].get('CNN', 0)):.3f}, transformer layers "
              f"{C.gib(acts['transformer_layers_bytes']):.3f}")
        for v, r in acts_lowrank.items():
            print(f"  {v}: {C.gib(r['total_bytes']):.3f} GiB, CNN {C.gib(r['per_group_bytes'].get('CNN', 0)):.3f}, "
                  f"transformer layers {C.gib(r['transformer_layers_bytes']):.3f}")
        C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "steps": a.steps,
                            "warmup": a.warmup, "rounds": a.rounds, "mmap_threshold": a.mmap_threshold,
                            "batch": [BATCH, SECONDS], "wall_s": time.time() - t_start,
                            "results": results, "runs": runs, "bf16_delta": bf16, "saved_activations": acts,
                            "saved_activations_lowrank": acts_lowrank})
        print(f"\nwall {time.time() - t_start:.0f} s; written {a.out}")
    finally:
        shutil.rmtree(vector_dir, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
