"""tools/plan_memory.py (issue 13.3): live-memory tracking, meta == real device, autocast emulation, plans.
The CPU validation against measured peaks (≤ 15%) is benchmarks/bench_plan_memory.py (benchmarks/RESULTS.md)."""
import json

import pytest
import torch

from tools import plan_memory as PM

ROW = "recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml"
TINY = json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "do_stable_layer_norm": True, "feat_extract_norm": "layer", "conv_bias": True,
                   "conv_dim": [32] * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4})
SETTINGS = {"num_vectors": 2, "lambda_mode": "layerwise", "merge_impl": "materialized", "delta_dtype": None,
            "gradient_checkpointing": False, "precision": "fp32", "head_hidden": 16, "pooling": "mean",
            "batch_size": 32}


def test_live_memory_counts_saved_and_freed_tensors():
    w = torch.randn(256, 256, requires_grad=True)  # created outside: never counted
    x = torch.randn(64, 256)
    m = PM.LiveMemory()
    with m:
        h = x @ w               # 64 kB, not saved by tanh (it saves its output)
        a = torch.tanh(h)       # 64 kB, saved
        del h
        b = torch.tanh(a)
        del a
        view = b.t()            # a view: no new memory
        assert m.live == m.peak == 2 * 64 * 256 * 4  # a (saved by its tanh) and b; h died before b came
        del view
        b.sum().backward()
    assert m.largest == 256 * 256 * 4  # w.grad
    assert m.live == 256 * 256 * 4 + 64 * 256 * 4  # w.grad and b (still referenced); backward freed a


def test_meta_run_allocates_exactly_like_the_cpu_run():
    """The same two training steps on meta and on the CPU create and free the same tensors."""
    out = {}
    for device in ("meta", "cpu"):
        modules = PM.build_adaltm(PM.wavlm_config(TINY), 2, merge_impl="fused", gradient_checkpointing="cnn",
                                  head_hidden=16, device=device)
        out[device] = PM.train_steps(modules, 2, 0.3, device=device)
        out[device]["model"] = PM.model_bytes(modules)[0]
    assert out["meta"] == out["cpu"]
    assert out["meta"]["dynamic_peak"] > out["meta"]["saved_for_backward"] > 0


def test_peak_is_affine_in_the_micro_batch():
    peaks = [PM.predict(SETTINGS, b, 0.5, shape=TINY)["peak"] for b in (1, 2, 4)]
    # plans extrapolate from batch 1 and 2 (and confirm the pick directly): within 1% at 4
    assert peaks[2] == pytest.approx(peaks[0] + 3 * (peaks[1] - peaks[0]), rel=0.01)
    assert peaks[1] - peaks[0] > 0.4 * peaks[0]  # activations dominate even at this size


def test_emulated_autocast_casts_like_cuda_autocast():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    saved = PM.SavedBytes(exclude=[])
    with saved, PM.EmulatedAutocast("cuda"):
        y = lin(x)
        p = torch.softmax(y, dim=-1)
        again = lin(x)
    assert y.dtype == torch.bfloat16 and p.dtype == torch.float32 and again.dtype == torch.bfloat16
    # x needs no grad, so linear saves only its bf16 x (cast anew per call), softmax its fp32 output
    assert saved.total == 2 * 8 * 64 * 2 + 8 * 64 * 4
    x.requires_grad_(True)  # now W is saved too; casts of leaves requiring grad are cached: one copy each
    saved = PM.SavedBytes(exclude=[])
    with saved, PM.EmulatedAutocast("cuda"):
        lin(x), lin(x)
    assert saved.total == 8 * 64 * 2 + 64 * 64 * 2
    with PM.EmulatedAutocast("cpu"):
        assert torch.softmax(lin(x), dim=-1).dtype == torch.bfloat16  # CPU autocast keeps softmax in bf16


def test_model_bytes_of_the_merge_options():
    """Materialized keeps one more copy of W than fused; bf16 ΔW halve the task vectors. Exact bytes."""
    cfg = PM.wavlm_config(TINY)
    w = sum(p.numel() for p in PM.build_adaltm(cfg, 0, device="meta")[0].parameters())  # W_base
    sizes = {(impl, dt): PM.model_bytes(PM.build_adaltm(cfg, 2, merge_impl=impl, delta_dtype=dt, device="meta"))[0]
             for impl, dt in (("materialized", None), ("fused", None), ("fused", torch.bfloat16))}
    assert sizes["materialized", None] - sizes["fused", None] == 4 * w
    assert sizes["fused", None] - sizes["fused", torch.bfloat16] == 2 * 2 * w
    # at WavLM-Large shape (meta: no compute, no memory): W, its copy and two ΔW = 4 x 315M fp32
    large = PM.model_bytes(PM.build_adaltm(PM.wavlm_config("large"), 2, device="meta"))[0]
    assert large / PM.GIB == pytest.approx(4 * 315.46e6 * 4 / PM.GIB, rel=2e-3)


def test_plan_picks_largest_fitting_micro_batch_then_checkpointing():
    p1, p2 = (PM.predict(SETTINGS, b, 0.5, shape=TINY)["peak"] for b in (1, 2))
    gib = (p1 + 3.5 * (p2 - p1)) / PM.GIB  # micro-batch 4 fits, 8 does not
    plan = PM.plan(SETTINGS, 0.5, 1, gib, margin=0, overhead_gib=0, shape=TINY)
    assert (plan["micro_batch_size"], plan["grad_accumulation_factor"], plan["gradient_checkpointing"]) == (4, 8, False)
    plan = PM.plan(SETTINGS, 0.5, 2, gib, margin=0, overhead_gib=0, shape=TINY)
    assert (plan["micro_batch_size"], plan["grad_accumulation_factor"], plan["effective_batch"]) == (4, 4, 32)
    # micro-batch 1 does not fit without checkpointing: recompute the CNN in backward (before all groups)
    cnn = PM.predict({**SETTINGS, "gradient_checkpointing": "cnn"}, 1, 0.5, shape=TINY)["peak"]
    assert cnn < p1
    plan = PM.plan(SETTINGS, 0.5, 1, (cnn + p1) / 2 / PM.GIB, margin=0, overhead_gib=0, shape=TINY)
    assert (plan["micro_batch_size"], plan["grad_accumulation_factor"], plan["gradient_checkpointing"]) == (1, 32, "cnn")
    assert not PM.fits(p1, p1 / PM.GIB, margin=0.15, overhead_gib=0)  # the margin is applied


def test_read_row_and_cli(tmp_path, capsys):
    s = PM.read_row(ROW)
    assert (s["num_vectors"], s["lambda_mode"], s["merge_impl"], s["delta_dtype"]) == (2, "layerwise", "materialized",
                                                                                        None)
    row = tmp_path / "row.yaml"
    row.write_text(f"base_hparams: {(PM.REPO / ROW).parent / '..' / 'adaltm.yaml'}\nexperiment: x\n"
                   "delta_dtype: !name:torch.bfloat16\ngradient_checkpointing: cnn\n")
    s = PM.read_row(row)
    assert (s["num_vectors"], s["delta_dtype"], s["gradient_checkpointing"]) == (0, "bfloat16", "cnn")
    out = PM.main([ROW, "--batch", "2", "--max_duration", "0.5", "--shape", TINY, "--json", str(tmp_path / "p.json")])
    assert "per GPU" in capsys.readouterr().out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["prediction"]["peak"] == out["prediction"]["peak"] == PM.predict(
        {**PM.read_row(ROW)}, 2, 0.5, shape=TINY)["peak"]


@pytest.mark.parametrize("bad", ["huge"])
def test_bad_shape_is_named(bad):
    with pytest.raises(ValueError, match="--shape 'huge'"):
        PM.wavlm_config(bad)
