"""Low-rank task vectors (lobes.adaltm.low_rank) and the exact λ gradient without dW GEMM
(lobes.adaltm.lowrank_linear): truncation, cache identity, LoRA factors, finite differences, reference equality."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lobes.adaltm import low_rank
from lobes.adaltm.lowrank_linear import LowRankConv1d, LowRankLinear, LowRankOps
from lobes.adaltm.task_vector import TaskVector, load_task_vector, save_task_vector
from lobes.errors import DataError


def _factors(out, inner, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = sum(ranks)
    return torch.randn(out, r, generator=g, dtype=dtype), torch.randn(inner, r, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------ truncation
def test_rank_spec_and_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert low_rank.rank_for(s, 2) == 2 and low_rank.rank_for(s, 10) == 3  # never above the true rank
    assert low_rank.rank_for(s, 9 / 14) == 1 and low_rank.rank_for(s, 0.65) == 2 and low_rank.rank_for(s, 0.99) == 3
    assert low_rank.rank_for(torch.zeros(3), 4) == 0
    for bad in (0, -3, 1.0, 0.0, 1.5, "32", True):
        with pytest.raises(DataError, match="delta_rank"):
            low_rank.check_rank_spec(bad)
    assert low_rank.spec_tag(32) == "r32" and low_rank.spec_tag(0.9) == "e0.9"


def test_truncation_is_the_best_rank_r_approximation_and_vectors_stay_dense():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 3, generator=g), torch.randn(3, 10, generator=g)
    low = a @ b  # exactly rank 3
    conv = torch.randn(6, 5, 2, generator=g)  # a conv kernel: [out, in * k] = [6, 10]
    delta = {"w_low": low, "conv": conv, "bias": torch.randn(6, generator=g), "g": torch.randn(1, 1, 4, generator=g)}
    fv = low_rank.factorize("tv", delta, 3)
    assert sorted(fv.factors) == ["conv", "w_low"] and sorted(fv.dense) == ["bias", "g"]
    assert torch.equal(fv.dense["bias"], delta["bias"]) and torch.equal(fv.dense["g"], delta["g"])
    assert (fv.delta("w_low") - low).abs().max() < 1e-5  # rank 3 keeps all of a rank-3 matrix
    u, v = fv.factors["conv"]
    assert u.shape == (6, 3) and v.shape == (10, 3) and fv.delta("conv").shape == (6, 5, 2)
    # Eckart-Young: the error is the norm of the dropped singular values
    s = torch.linalg.svdvals(conv.reshape(6, 10).double())
    err = (fv.delta("conv").double() - conv.double()).norm()
    assert abs(float(err) - float(s[3:].norm())) < 1e-5
    # energy 0.9 keeps the fewest components reaching 90% of ||ΔW||²
    r9 = low_rank.factorize("tv", {"conv": conv}, 0.9).rank("conv")
    cum = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
    assert cum[r9 - 1] >= 0.9 and (r9 == 1 or cum[r9 - 2] < 0.9)


def test_cache_is_rebuilt_when_the_vector_or_the_spec_changes(tmp_path, caplog):
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "ser.safetensors"
    save_task_vector(TaskVector("SER", {"feature_projection.projection.weight": torch.randn(8, 12, generator=g),
                                        "feature_projection.projection.bias": torch.randn(8, generator=g)}), path)
    with caplog.at_level(logging.INFO, logger="lobes.adaltm.low_rank"):
        first = low_rank.cached_factored(path, 2)
        cache = low_rank.cache_path(path, 2)
        assert cache.name == "ser.r2.lowrank.safetensors" and cache.exists()
        mtime = cache.stat().st_mtime_ns
        again = low_rank.cached_factored(path, 2)  # same content, same spec: read, not rebuilt
        assert cache.stat().st_mtime_ns == mtime and "rebuilding" not in caplog.text
        assert torch.equal(again.factors["feature_projection.projection.weight"][0],
                           first.factors["feature_projection.projection.weight"][0])
        # a changed vector file (same name) invalidates the cache by content hash
        save_task_vector(TaskVector("SER", {"feature_projection.projection.weight": torch.ones(8, 12),
                                            "feature_projection.projection.bias": torch.zeros(8)}), path)
        changed = low_rank.cached_factored(path, 2)
        assert "rebuilding" in caplog.text and "task vector file changed" in caplog.text
        assert changed.rank("feature_projection.projection.weight") == 1  # ones: rank 1
        assert (changed.delta("feature_projection.projection.weight") - 1).abs().max() < 1e-6
        # the same cache file holding another spec (copied over by hand) is rebuilt too
        low_rank.cached_factored(path, 3)
        low_rank.cache_path(path, 3).replace(cache)
        caplog.clear()
        low_rank.cached_factored(path, 2)
        assert "rank spec r3 != r2" in caplog.text
    assert json.loads(low_rank.load_factored(cache).metadata["shapes"]) == {
        "feature_projection.projection.weight": [8, 12]}


def test_task_vector_file_keeps_exact_factors(tmp_path):
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(8, 2, generator=g), torch.randn(12, 2, generator=g)
    delta = {"feature_projection.projection.weight": u @ v.T, "feature_projection.projection.bias": torch.zeros(8)}
    tv = TaskVector("LORA", delta, factors={"feature_projection.projection.weight": (u, v)})
    save_task_vector(tv, tmp_path / "lora.safetensors")
    back = load_task_vector(tmp_path / "lora.safetensors")
    assert sorted(back.delta) == sorted(delta) and back.metadata["fingerprint"] == tv.metadata["fingerprint"]
    assert torch.equal(back.factors["feature_projection.projection.weight"][1], v)
    fv = low_rank.cached_factored(tmp_path / "lora.safetensors", 1)  # spec 1 < LoRA rank 2: factors win
    assert fv.rank("feature_projection.projection.weight") == 2
    assert torch.equal(fv.factors["feature_projection.projection.weight"][0], u)


# ------------------------------------------------------------------------------------ exact λ gradient
def test_linear_gradients_match_finite_differences():
    ranks = (3, 0, 2)  # a vector with nothing left of this weight (rank 0) still has a (zero) gradient
    u, v = _factors(5, 7, ranks)
    base = torch.randn(5, 7, dtype=torch.float64)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, -0.8, 1.1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, lam, b: LowRankLinear.apply(x, lam, base, b, u, v, ranks),
                                    (x, lam, bias))


def test_conv_gradients_match_finite_differences():
    ranks = (2, 3)
    base = torch.randn(4, 3, 5, dtype=torch.float64)
    u, v = _factors(4, 15, ranks)
    x = torch.randn(2, 3, 17, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.6, -0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, lam: LowRankConv1d.apply(x, lam, base, None, u, v, ranks, 2, 1, 1), (x, lam))


def test_linear_and_conv_equal_plain_autograd_on_the_same_factors():
    torch.manual_seed(4)
    ranks = (4, 2)
    cases = [("linear", (6, 9), (3, 5, 9)), ("conv", (6, 4, 3), (2, 4, 20))]
    for kind, wshape, xshape in cases:
        base = torch.randn(wshape)
        u, v = _factors(wshape[0], base[0].numel(), ranks, torch.float32)
        x = torch.randn(xshape, requires_grad=True)
        lam = torch.tensor([0.4, 1.3], requires_grad=True)
        dy = torch.randn_like(F.linear(x, base) if kind == "linear" else F.conv1d(x, base, stride=2))
        lam_r = torch.cat([lam[0].expand(4), lam[1].expand(2)])
        w_ref = base + (u * lam_r @ v.T).view(wshape)  # W_base + Σ λ_k U_k V_kᵀ, plain autograd
        ref = F.linear(x, w_ref) if kind == "linear" else F.conv1d(x, w_ref, stride=2)
        gx_ref, gl_ref = torch.autograd.grad(ref, (x, lam), dy)
        got = (LowRankLinear.apply(x, lam, base, None, u, v, ranks) if kind == "linear"
               else LowRankConv1d.apply(x, lam, base, None, u, v, ranks, 2, 0, 1))
        gx, gl = torch.autograd.grad(got, (x, lam), dy)
        assert (got - ref).abs().max() <= 1e-5 and (gx - gx_ref).abs().max() <= 1e-5, kind
        assert torch.allclose(gl, gl_ref, rtol=1e-5, atol=1e-5), (kind, gl, gl_ref)


def test_backward_keeps_only_the_r_wide_projection():
    """The linear saves p = Vᵀ x ([..., R]) and the stored weights, never x or a merged W."""
    ranks = (2,)
    base, (u, v) = torch.randn(16, 32), _factors(16, 32, ranks, torch.float32)
    x = torch.randn(10, 32, requires_grad=True)
    lam = torch.tensor([0.5], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LowRankLinear.apply(x * 1.0, lam, base, None, u, v, ranks)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert (10, 2) in shapes and (10, 32) not in shapes  # p, not x
    assert sum(t.untyped_storage().nbytes() for t in saved if t.shape == (16, 32)) == base.numel() * 4  # W_base only


def test_router_runs_wavlm_attention_like_torch():
    """LowRankOps routes the four projections of F.multi_head_attention_forward (WavLM's call) and gives torch's
    own result for the merged weights."""
    torch.manual_seed(5)
    e, heads, t, b = 8, 2, 6, 3
    ws = {n: torch.randn(e, e) / e ** 0.5 for n in "qkvo"}  # activations of order 1, as in a trained model
    fac = {n: tuple(0.1 * f for f in _factors(e, e, (2,), torch.float32, seed=i)) for i, n in enumerate("qkvo")}
    lam = torch.tensor([0.7], requires_grad=True)
    biases = torch.randn(3 * e)
    ob = torch.randn(e)
    x = torch.randn(t, b, e)
    bias = torch.randn(b * heads, t, t)
    kpm = torch.zeros(b, t, dtype=torch.bool)
    kpm[1, 4:] = True

    def mha(w):
        return F.multi_head_attention_forward(x, x, x, e, heads, torch.empty([0]), biases, None, None, False, 0.1,
                                              w["o"], ob, False, kpm, False, bias, use_separate_proj_weight=True,
                                              q_proj_weight=w["q"], k_proj_weight=w["k"], v_proj_weight=w["v"])[0]

    merged = {n: ws[n] + lam * (fac[n][0] @ fac[n][1].T) for n in "qkvo"}
    ref = mha(merged)
    g_ref, = torch.autograd.grad(ref.pow(2).sum(), lam)
    with LowRankOps({id(ws[n]): (lam, *fac[n], (2,)) for n in "qkvo"}):
        got = mha(ws)
    g, = torch.autograd.grad(got.pow(2).sum(), lam)
    assert (got - ref).abs().max() <= 1e-5 and torch.allclose(g, g_ref, rtol=1e-5), (g, g_ref)
    with pytest.raises(NotImplementedError, match="self-attention call only"), LowRankOps(
            {id(ws[n]): (lam, *fac[n], (2,)) for n in "qkvo"}):
        F.multi_head_attention_forward(x, x, x, e, heads, torch.empty([0]), biases, None, None, False, 0.0,
                                       ws["o"], ob, False, kpm, True, bias, use_separate_proj_weight=True,
                                       q_proj_weight=ws["q"], k_proj_weight=ws["k"], v_proj_weight=ws["v"])


def test_bad_cache_file_is_rebuilt(tmp_path):
    path = tmp_path / "asr.safetensors"
    save_task_vector(TaskVector("ASR", {"feature_projection.projection.weight": torch.eye(4)}), path)
    save_file({"x": torch.zeros(1)}, str(low_rank.cache_path(path, 0.9)))  # not a low-rank vector
    fv = low_rank.cached_factored(path, 0.9)
    assert fv.rank("feature_projection.projection.weight") == 4  # eye: every direction holds 1/4 of the energy


# ------------------------------------------------------------------------------------- LoRA sources exact
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_lora_sources_are_imported_as_their_exact_factors(tmp_path, merged):
    """The importer's vox-profile LoRA cases: the task vector carries (B·scaling, Aᵀ) and its factored form
    reconstructs the dense ΔW to 1e-6 at any delta_rank (no truncation error), while the other weights are
    truncated."""
    from safetensors.torch import load_file
    from test_checkpoint_import import _voxprofile_state  # tests/ is on sys.path

    from tools.extract_task_vector import extract_task_vector
    from tools.make_tiny_wavlm import make_tiny_wavlm

    base_dir, ft_dir = make_tiny_wavlm(tmp_path / "base", seed=0), make_tiny_wavlm(tmp_path / "ft", seed=1)
    tiny = {"base": load_file(str(base_dir / "model.safetensors")), "ft": load_file(str(ft_dir / "model.safetensors"))}
    sd, lora, _ = _voxprofile_state(tiny, [2, 3], 4, merged=merged)
    (tmp_path / "vox").mkdir()
    save_file(sd, str(tmp_path / "vox" / "model.safetensors"))
    out = extract_task_vector(base_dir, tmp_path / "vox", "SER", tmp_path / "ser.safetensors", verbose=False)
    tv = load_task_vector(out)
    assert sorted(tv.factors) == sorted(m + ".weight" for m in lora)  # 4 LoRA-wrapped linears
    fv = low_rank.cached_factored(out, 1)  # rank 1 everywhere else; the LoRA weights keep rank 4
    for m, (a, b) in lora.items():
        key = m + ".weight"
        assert fv.rank(key) == 4
        assert (fv.delta(key) - tv.delta[key]).abs().max() <= 1e-6, key
        assert torch.allclose(fv.delta(key), (b @ a) * 0.25, rtol=0, atol=1e-6)
    # a weight that was fully fine-tuned is truncated: rank 1 of a random 32 x 32 ΔW is far from it
    full = "encoder.layers.0.attention.q_proj.weight"
    assert fv.rank(full) == 1 and (fv.delta(full) - tv.delta[full]).norm() > 0.5 * tv.delta[full].norm()


def test_peft_adapter_source_is_imported_as_its_exact_factors(tmp_path):
    """A peft adapter (save_pretrained, rsLoRA r=4) as the SER source: the task vector file keeps its factors and
    delta_rank 1 leaves the 12 LoRA weights at rank 4, equal to merge_and_unload − base to 1e-6."""
    from safetensors.torch import load_file
    from test_checkpoint_import import _peft_wavlm  # tests/ is on sys.path

    from tools.extract_task_vector import extract_task_vector
    from tools.make_tiny_wavlm import make_tiny_wavlm

    base_dir = make_tiny_wavlm(tmp_path / "base", seed=0)
    base = load_file(str(base_dir / "model.safetensors"))
    model = _peft_wavlm(base_dir, dict(r=4, lora_alpha=8, use_rslora=True))
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    merged = model.merge_and_unload().state_dict()
    out = extract_task_vector(base_dir, tmp_path / "adapter", "SER", tmp_path / "ser.safetensors", verbose=False)
    tv = load_task_vector(out)
    assert tv.metadata["kind"] == "peft" and len(tv.factors) == 12
    fv = low_rank.cached_factored(out, 1)
    for key in tv.factors:
        assert fv.rank(key) == 4
        assert torch.allclose(fv.delta(key), merged[key] - base[key], rtol=0, atol=1e-6), key
    untouched = "encoder.layers.0.attention.k_proj.weight"  # not a LoRA target: ΔW = 0
    assert float(tv.delta[untouched].abs().max()) == 0.0


def test_spectrum_tool_energy_per_group(tmp_path):
    """Known spectra: layer 1's matrix has singular values 3, 2, 1 (energy 9/14 at r=1), the CNN conv is zero."""
    import tools.task_vector_spectrum as spec

    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    m = q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ q[:, 3:].T  # [6, 6], σ = 3, 2, 1
    delta = {"encoder.layers.0.attention.q_proj.weight": m, "encoder.layers.0.attention.q_proj.bias": torch.ones(6),
             "feature_extractor.conv_layers.0.conv.weight": torch.zeros(4, 1, 5),
             "encoder.layers.0.feed_forward.output_dense.weight": torch.ones(6, 6)}  # rank 1, energy 36
    save_task_vector(TaskVector("SER", delta), tmp_path / "ser.safetensors")
    results, md = spec.run([tmp_path / "ser.safetensors"], tmp_path / "out", ranks=(1, 2, 8))
    layer1, cnn = results["ser (SER)"][1], results["ser (SER)"][0]
    assert layer1["energy"][1] == pytest.approx((9 + 36) / (14 + 36), abs=1e-6)
    assert layer1["energy"][2] == pytest.approx((13 + 36) / 50, abs=1e-6) and layer1["energy"][8] == pytest.approx(1.0)
    assert layer1["rank_0.9"] == 1.5 and layer1["matrices"] == 2  # median of 2 (13/14 ≥ 0.9 > 9/14) and 1
    assert cnn["zero_matrices"] == 1 and cnn["rank_0.9"] == 0
    assert "| L1 | 2 (0) | 0.900 | 0.980 | 1.000 | 1.5 |" in md
    assert (tmp_path / "out" / "spectrum.png").stat().st_size > 0
