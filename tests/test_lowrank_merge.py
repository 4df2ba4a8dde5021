"""merge_impl="lowrank" in MergedWavLM: on the same truncated task vectors (delta_rank) it gives the outputs and λ
gradients of the plain-autograd reference (≤ 1e-5), matches finite differences, accumulates, checkpoints, keeps
no dense ΔW of a factored weight, and folds to an exact plain WavLM."""
import pytest
import torch
from transformers import WavLMModel

from lobes.adaltm import lowrank_linear
from lobes.adaltm.fold_export import fold_to_wavlm
from lobes.adaltm.merged_wavlm import MergedWavLM
from lobes.errors import DataError
from lobes.wavlm_encoder import run_wavlm
from tools.make_tiny_wavlm import make_tiny_wavlm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = make_tiny_wavlm(tmp_path_factory.mktemp("lowrank") / "base", seed=0)
    state = WavLMModel.from_pretrained(base).state_dict()
    g = torch.Generator().manual_seed(11)
    asr = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    ser = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return base, asr, ser


def _wavs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 8000, generator=g).to(dtype), torch.tensor([1.0, 0.7])


def _model(tiny, impl, rank=3, **kw):
    base, asr, ser = tiny
    m = MergedWavLM(base, {"ASR": asr, "SER": ser}, merge_impl=impl, delta_rank=rank, **kw)
    with torch.no_grad():  # distinct λ per vector and group, so a mixed-up column would show
        m.lambdas.lam.copy_(torch.linspace(-0.4, 1.3, m.lambdas.lam.numel()).view(m.lambdas.lam.shape))
    return m


def _loss(m, wavs, lens):
    h, mask = m(wavs, lens)
    return (h * mask[None, ..., None]).pow(2).mean() + h[1].mean(), h


def _run(m):
    loss, h = _loss(m, *_wavs())
    loss.backward()
    return h.detach(), m.lambdas.lam.grad.clone()


@pytest.mark.parametrize("rank", [3, 0.9], ids=["r3", "energy0.9"])
@pytest.mark.parametrize("kw", [{}, {"gradient_checkpointing": True}, {"gradient_checkpointing": "cnn"}],
                         ids=["plain", "checkpointing", "checkpointing_cnn"])
def test_lowrank_equals_functional_on_the_same_truncated_vectors(tiny, kw, rank):
    h_ref, g_ref = _run(_model(tiny, "functional", rank, **kw))
    m = _model(tiny, "lowrank", rank, **kw)
    h, g = _run(m)
    assert g.shape == (2, 5) and g.abs().min() > 0  # every group of both vectors gets a gradient
    assert (h - h_ref).abs().max().item() <= 1e-5
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-5), (g - g_ref).abs().max()
    # every Linear and CNN conv weight runs the no-dW path; the positional conv (weight norm) and the
    # relative-position embedding are the ones merged by plain autograd
    factored = set(m.lowrank_ranks)
    assert factored - m.lowrank_routed == {"encoder.pos_conv_embed.conv.parametrizations.weight.original1",
                                           "encoder.layers.0.attention.rel_attn_embed.weight"}
    assert sum(k.startswith("feature_extractor.conv_layers.") for k in m.lowrank_routed) == 7
    assert sum(k.endswith("_proj.weight") for k in m.lowrank_routed) == 4 * 4  # q, k, v, out of 4 layers


def test_zero_cnn_delta_is_not_routed_and_equals_functional(tiny):
    """The fine-tuning recipes freeze the CNN, so its ΔW is 0 in every vector (rank 0): the mini demo's
    setup4_dual_lowrank failed in conv1d ("expected weight to be at least 1 at dimension 0, but got weight of size
    [0, 1, 10]"). Those weights are merged by autograd; the rest stays on the no-dW path."""
    base, asr, ser = tiny

    def frozen_cnn(vec):
        return {k: (torch.zeros_like(v) if k.startswith("feature_extractor.") else v) for k, v in vec.items()}

    vectors = (base, frozen_cnn(asr), frozen_cnn(ser))
    m_ref, m = _model(vectors, "functional"), _model(vectors, "lowrank")
    (h_ref, g_ref), (h, g) = _run(m_ref), _run(m)
    assert (h - h_ref).abs().max().item() <= 1e-5
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-5), (g - g_ref).abs().max()
    assert all(m.lowrank_ranks[k] == (0, 0) for k in m.lowrank_ranks if k.startswith("feature_extractor.conv"))
    assert not any(k.startswith("feature_extractor.conv_layers.") for k in m.lowrank_routed)
    assert sum(k.endswith("_proj.weight") for k in m.lowrank_routed) == 4 * 4


def test_truncation_changes_the_model_and_full_rank_does_not(tiny):
    """delta_rank really truncates (the reference at r=3 differs from the exact merge), and the factors of a
    rank that keeps everything reproduce the exact merge."""
    base, asr, ser = tiny
    exact = MergedWavLM(base, {"ASR": asr, "SER": ser}, merge_impl="functional")
    with torch.no_grad():
        h_exact, _ = exact(*_wavs())
        h3, _ = _model(tiny, "functional", 3)(*_wavs())
        full = _model(tiny, "lowrank", 10_000)
        exact.lambdas.lam.copy_(full.lambdas.lam)
        h_exact, _ = exact(*_wavs())
        h_full, _ = full(*_wavs())
    assert (h_full - h_exact).abs().max() <= 1e-5
    assert (h3 - h_exact).abs().max() > 1e-2


def test_lambda_gradient_matches_finite_differences(tiny):
    m = _model(tiny, "lowrank").double()
    wavs, lens = _wavs(torch.float64)
    loss, _ = _loss(m, wavs, lens)
    (grad,) = torch.autograd.grad(loss, m.lambdas.lam)
    d = torch.randn(m.lambdas.lam.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        lam0 = m.lambdas.lam.clone()
        m.lambdas.lam.copy_(lam0 + eps * d)
        up = _loss(m, wavs, lens)[0]
        m.lambdas.lam.copy_(lam0 - eps * d)
        down = _loss(m, wavs, lens)[0]
    fd = float((up - down) / (2 * eps))
    assert abs(fd - float((grad * d).sum())) <= 1e-6 * max(1.0, abs(fd)), (fd, float((grad * d).sum()))


def test_accumulated_micro_batches_equal_one_batch(tiny):
    """Two micro-batches backward one after the other accumulate into λ.grad exactly as their summed loss."""
    m = _model(tiny, "lowrank")
    wavs, lens = _wavs()
    _loss(m, wavs[:1], lens[:1])[0].backward()
    _loss(m, wavs[1:], lens[1:])[0].backward()
    accumulated = m.lambdas.lam.grad.clone()
    m.lambdas.lam.grad = None
    (_loss(m, wavs[:1], lens[:1])[0] + _loss(m, wavs[1:], lens[1:])[0]).backward()
    assert torch.allclose(accumulated, m.lambdas.lam.grad, rtol=1e-6, atol=1e-7)


def test_no_dense_delta_of_a_factored_weight_is_kept(tiny):
    m = _model(tiny, "lowrank")
    dense_keys = {k for store in m.deltas for k in store}
    assert not any(k.replace(".", "__") in dense_keys for k in m.lowrank_ranks)
    key = "encoder.layers.1.feed_forward.intermediate_dense.weight"  # [64, 32]: rank 3 of each of 2 vectors
    name = key.replace(".", "__")
    assert m.lowrank_factors[name + "__U"].shape == (64, 6) and m.lowrank_factors[name + "__V"].shape == (32, 6)
    assert m.lowrank_ranks[key] == (3, 3)
    with pytest.raises(DataError, match="merge_impl 'lowrank' needs delta_rank"):
        MergedWavLM(tiny[0], {"ASR": tiny[1]}, merge_impl="lowrank")


def test_lowrank_folds_to_an_exact_plain_wavlm(tiny):
    m = _model(tiny, "lowrank")
    with torch.no_grad():
        h, mask = m(*_wavs())
        folded = fold_to_wavlm(m)
        h_folded, mask_folded = run_wavlm(folded, *_wavs())
    assert type(folded) is WavLMModel and torch.equal(mask, mask_folded)
    assert (h - h_folded).abs().max().item() <= 1e-5
    key = "encoder.layers.2.attention.q_proj.weight"
    expect = lowrank_linear.merged_factored(m, key, m.lambdas().detach())
    assert torch.equal(folded.state_dict()[key], expect)
