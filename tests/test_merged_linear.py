"""merge_impl="fused" and "materialized" (lobes.adaltm.merged_linear): same outputs and λ gradients as the functional
path; fused merged weights are not kept alive by autograd (rebuilt in backward); materialized stored weights
follow λ in place and stay equal to eq. (4)."""
import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import WavLMModel

from lobes.adaltm.merged_linear import MergeWeight, RebuildMergedInBackward, merge_values, stacked_view
from lobes.adaltm.merged_wavlm import MergedWavLM
from tools.make_tiny_wavlm import make_tiny_wavlm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = make_tiny_wavlm(tmp_path_factory.mktemp("fused") / "base", seed=0)
    state = WavLMModel.from_pretrained(base).state_dict()
    g = torch.Generator().manual_seed(11)
    asr = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    ser = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return base, asr, ser


def _wavs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 8000, generator=g), torch.tensor([1.0, 0.7])


def _run(base, asr, ser, impl, **kw):
    m = MergedWavLM(base, {"ASR": asr, "SER": ser}, merge_impl=impl, **kw)
    with torch.no_grad():  # distinct λ per vector and group, so a mixed-up column would show
        m.lambdas.lam.copy_(torch.linspace(-0.4, 1.3, m.lambdas.lam.numel()).view(m.lambdas.lam.shape))
    h, mask = m(*_wavs())
    ((h * mask[None, ..., None]).pow(2).mean() + h[1].mean()).backward()
    return h.detach(), m.lambdas.lam.grad.clone()


@pytest.mark.parametrize("impl", ["fused", "materialized"])
@pytest.mark.parametrize("kw", [{}, {"gradient_checkpointing": True}, {"gradient_checkpointing": "cnn"},
                                {"delta_dtype": torch.bfloat16}],
                         ids=["plain", "checkpointing", "checkpointing_cnn", "bf16_delta"])
def test_fused_and_materialized_equal_functional(tiny, kw, impl):
    base, asr, ser = tiny
    h_ref, g_ref = _run(base, asr, ser, "functional", **kw)
    h, g = _run(base, asr, ser, impl, **kw)
    assert g.shape == (2, 5) and g.abs().min() > 0  # every group of both vectors gets a gradient
    assert (h - h_ref).abs().max().item() <= 1e-5
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-5), (g - g_ref).abs().max()


def test_fused_fixed_lambda_runs_without_graph(tiny):
    base, asr, ser = tiny
    ref, _ = MergedWavLM(base, {"ASR": asr, "SER": ser}, lambda_mode="fixed")(*_wavs())
    fused = MergedWavLM(base, {"ASR": asr, "SER": ser}, lambda_mode="fixed", merge_impl="fused")
    got, _ = fused(*_wavs())
    assert not got.requires_grad and (got - ref).abs().max().item() <= 1e-5
    # the fused layout keeps every ΔW's name and value, now as rows of one [K, n] tensor per key
    key = "encoder__layers__1__feed_forward__intermediate_dense__weight"
    assert stacked_view([s[key] for s in fused.deltas]) is not None
    assert all(torch.equal(fused.deltas[i][k.replace(".", "__")], vec[k])
               for i, vec in enumerate((asr, ser)) for k in vec)
    with pytest.raises(ValueError, match="merge_impl 'naive' is not one of"):
        MergedWavLM(base, {"ASR": asr}, merge_impl="naive")


def _stacked_pair(d1, d2):
    rows = torch.stack([d1, d2])  # the layout MergedWavLM loads fused / materialized ΔW into
    return rows[0], rows[1]


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked_gemv"])
def test_merge_weight_gradient_is_the_inner_product(stacked):
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d1 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    d2 = torch.tensor([[0.5, 0.5], [2.0, 0.0]])
    if stacked:
        d1, d2 = _stacked_pair(d1, d2)
        view = stacked_view([d1, d2])
        assert view.shape == (2, 4) and view[1].tolist() == [0.5, 0.5, 2.0, 0.0]  # rows = ΔW_k, one storage
    else:
        assert stacked_view([d1, d2]) is None
    lam = torch.tensor([0.5, -2.0], requires_grad=True)
    w = MergeWeight.apply(lam, base, d1, d2)
    assert w.tolist() == [[1.0 + 0.5 - 1.0, 2.0 - 1.0], [3.0 - 4.0, 4.0 - 0.5]]
    grad_w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w.backward(grad_w)
    # dL/dλ_k = <dL/dW, ΔW_k>: 1 - 4 = -3 and 0.5 + 1 + 6 = 7.5
    assert lam.grad.tolist() == [-3.0, 7.5]


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked_gemv"])
def test_saved_merged_weight_is_freed_and_rebuilt_bitwise(stacked):
    g = torch.Generator().manual_seed(0)
    base, d1, d2 = (torch.randn(6, 4, generator=g) for _ in range(3))
    if stacked:
        d1, d2 = _stacked_pair(d1, d2)
    x = torch.randn(3, 4, generator=g).requires_grad_()  # so the linear must save w for dL/dx
    sources = {"weight": (base, [d1, d2])}

    def forward(rebuild):
        lam = torch.tensor([0.3, 0.9], requires_grad=True)
        w = MergeWeight.apply(lam, base, d1, d2)
        ref = StorageWeakRef(w.untyped_storage())
        if rebuild:
            with RebuildMergedInBackward({"weight": w}, sources, lam.tolist()):
                y = F.linear(x, w)  # saves x and a transposed view of w
        else:
            y = F.linear(x, w)
        del w
        alive = not ref.expired()
        (y * torch.arange(6.0)).sum().backward()
        return alive, lam.grad

    alive_plain, grad_plain = forward(False)
    alive_fused, grad_fused = forward(True)
    assert alive_plain and not alive_fused  # only the plain graph keeps the merged weight until backward
    assert torch.equal(grad_plain, grad_fused)  # rebuilt W is bitwise the forward one
    expected_w = base + 0.3 * d1 + 0.9 * d2
    assert torch.allclose(merge_values(base, [d1, d2], [0.3, 0.9]), expected_w, atol=1e-6)


def test_materialized_weights_follow_lambda_through_training_and_checkpoint_loads(tiny):
    """After optimizer steps, a λ restored from a checkpoint and a λ set by hand, the stored weights equal
    W_base + λ_ASR ΔW_ASR + λ_SER ΔW_SER (eq. 4) for the current λ, and the outputs equal a fresh model's."""
    base, asr, ser = tiny
    w_base = WavLMModel.from_pretrained(base).state_dict()
    m = MergedWavLM(base, {"ASR": asr, "SER": ser}, merge_impl="materialized")
    opt = torch.optim.SGD([m.lambdas.lam], lr=0.5)
    wavs, lens = _wavs()
    for _ in range(4):
        opt.zero_grad()
        h, _ = m(wavs, lens)
        h.pow(2).mean().backward()
        opt.step()
    with torch.no_grad():  # what a checkpoint load does to λ (in place, between steps)
        m.lambdas.lam.mul_(-1.5)
    h, _ = m(wavs, lens)
    lam = m.lambdas().detach()
    assert (lam - 0.5).abs().min() > 1e-3  # λ really moved away from its init in every entry
    for key in ("feature_extractor.conv_layers.0.conv.weight", "encoder.layers.1.attention.q_proj.weight",
                "encoder.pos_conv_embed.conv.bias"):
        g = m.group_of[key]
        expected = w_base[key] + lam[0, g] * asr[key] + lam[1, g] * ser[key]
        assert (m.base_parameter(key) - expected).abs().max().item() <= 1e-6, key
    fresh = MergedWavLM(base, {"ASR": asr, "SER": ser}, merge_impl="functional")
    with torch.no_grad():
        fresh.lambdas.lam.copy_(m.lambdas.lam)
        ref, _ = fresh(wavs, lens)
    assert (h.detach() - ref).abs().max().item() <= 1e-5
    assert not any(p.requires_grad for p in m.model.parameters())


def test_no_grad_forward_of_a_frozen_wavlm_restores_flags_and_matches_grad_mode(tiny):
    """run_wavlm lets frozen weights report requires_grad only inside a no-grad forward (kernel choice);
    the flags are restored, nothing gets a .grad, the hidden states equal a grad-mode run, and an eval-mode
    backbone does not consume the global RNG."""
    from lobes.wavlm_encoder import WavLMEncoder

    base, _, _ = tiny
    enc = WavLMEncoder(base, freeze=True).eval()
    wavs, lens = _wavs()
    with torch.no_grad():
        h_nograd, _ = enc(wavs, lens)
    assert not any(p.requires_grad for p in enc.parameters())
    h_grad, _ = enc(wavs, lens)  # grad mode: the weights stay frozen, the flag is not touched
    assert not h_grad.requires_grad and all(p.grad is None for p in enc.parameters())
    assert (h_nograd - h_grad).abs().max().item() <= 1e-5
    # HF WavLM draws torch.rand per layer even in eval; an eval backbone leaves the global RNG where it was,
    # so the head's dropout masks are the same whether features come from a cache or from the backbone
    state = torch.get_rng_state()
    enc(wavs, lens)
    assert torch.equal(state, torch.get_rng_state())
