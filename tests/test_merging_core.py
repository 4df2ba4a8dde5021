"""AdaLTM merging core: eq. (4) per group and mode, groups, gradients, fold/export, α, head, soft CE."""
import json
import math

import pytest
import torch
from transformers import WavLMModel

from lobes.adaltm import layer_groups
from lobes.errors import DataError
from lobes.adaltm.fold_export import export_folded, load_downstream, load_folded_export
from lobes.losses import ClassBalancedSoftCE, effective_number_weights, soft_cross_entropy
from lobes.adaltm.merged_wavlm import MergedWavLM
from lobes.ser_head import SERHead
from lobes.wavlm_encoder import WavLMEncoder, run_wavlm
from lobes.weighted_sum import WeightedLayerSum
from tools.make_tiny_wavlm import make_tiny_wavlm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_wavlm(root / "base", seed=0)
    state = WavLMModel.from_pretrained(base).state_dict()
    g = torch.Generator().manual_seed(7)
    asr = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    ser = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return base, state, asr, ser


def _wavs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 8000, generator=g), torch.tensor([1.0, 0.6])


@pytest.mark.parametrize("mode", ["fixed", "global", "layerwise"])
def test_eq4_per_group_every_mode(tiny, mode):
    base, state, asr, ser = tiny
    m = MergedWavLM(base, {"ASR": asr, "SER": ser}, lambda_mode=mode)
    if mode != "fixed":
        with torch.no_grad():
            m.lambdas.lam.copy_(torch.rand(m.lambdas.lam.shape, generator=torch.Generator().manual_seed(1)))
    lam = m.lambdas().detach()
    assert lam.shape == (2, 5)
    if mode == "fixed":
        assert torch.all(lam == 0.5)
    if mode == "global":
        assert torch.all(lam[:, 0:1] == lam)
    merged = m.merged_state_dict()
    for k, w in merged.items():
        gidx = m.group_of[k]
        expected = state[k] + lam[0, gidx] * asr[k] + lam[1, gidx] * ser[k]
        assert torch.allclose(w, expected, atol=1e-6, rtol=0), k


def test_groups_cover_every_parameter_once(tiny):
    base, state, _, _ = tiny
    groups = {k: layer_groups.group_of(k, 4, True) for k in state}
    assert set(groups.values()) == set(range(5))
    assert groups["encoder.layers.0.attention.rel_attn_embed.weight"] == 1
    assert groups["encoder.layer_norm.weight"] == 4  # stable layer norm: after the last layer
    assert groups["encoder.pos_conv_embed.conv.parametrizations.weight.original0"] == 0
    # post-norm WavLM (Base layout): the encoder layer norm runs before layer 1
    assert layer_groups.group_of("encoder.layer_norm.bias", 4, stable_layer_norm=False) == 0
    # the wrapped submodules own every key exactly once (masked_spec_embed is merged only when folding)
    owners = {}
    for path, g in layer_groups.group_modules(4, True):
        for k in state:
            if k.startswith(path + "."):
                owners.setdefault(k, []).append(g)
    assert all(len(v) == 1 and v[0] == groups[k] for k, v in owners.items())
    assert set(owners) == {k for k in state if k != "masked_spec_embed"}
    with pytest.raises(DataError, match="lm_head.weight"):
        layer_groups.group_of("lm_head.weight", 4)


def test_only_lambda_alpha_head_are_trainable(tiny):
    base, _, asr, ser = tiny
    m = MergedWavLM(base, {"ASR": asr, "SER": ser})
    mods = torch.nn.ModuleDict({"wavlm": m, "ws": WeightedLayerSum(4), "head": SERHead(32, 16)})
    trainable = {n for n, p in mods.named_parameters() if p.requires_grad}
    assert "wavlm.lambdas.lam" in trainable and "ws.weights" in trainable
    assert all(n.startswith(("head.", "ws.")) or n == "wavlm.lambdas.lam" for n in trainable)
    # W_base and ΔW get no gradient after a backward pass
    h, mask = m(*_wavs())
    h.pow(2).mean().backward()
    assert m.lambdas.lam.grad is not None and m.lambdas.lam.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if n != "lambdas.lam")


def test_lambda_gradient_matches_finite_difference(tiny):
    base, _, asr, ser = tiny
    m = MergedWavLM(base, {"ASR": asr, "SER": ser}).double()
    wavs, lens = _wavs()
    wavs = wavs.double()

    def loss():
        h, mask = m(wavs, lens)
        return (h[-1] * mask[..., None]).pow(2).mean() + h[2].mean()

    loss().backward()
    grad = m.lambdas.lam.grad.clone()
    eps = 1e-6
    for k, g in [(0, 0), (1, 2), (0, 4), (1, 1)]:
        with torch.no_grad():
            m.lambdas.lam[k, g] += eps
            up = loss().item()
            m.lambdas.lam[k, g] -= 2 * eps
            down = loss().item()
            m.lambdas.lam[k, g] += eps
        fd = (up - down) / (2 * eps)
        assert grad[k, g].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_gradient_checkpointing_gives_the_same_lambda_gradient(tiny):
    base, _, asr, ser = tiny
    grads = []
    for gc in (False, True):
        m = MergedWavLM(base, {"ASR": asr, "SER": ser}, gradient_checkpointing=gc)
        h, mask = m(*_wavs())
        h.pow(2).mean().backward()
        grads.append(m.lambdas.lam.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_merge_changes_output_and_setup1_equals_plain_wavlm(tiny):
    base, _, asr, ser = tiny
    wavs, lens = _wavs()
    plain, _ = WavLMEncoder(base, freeze=True)(wavs, lens)
    setup1, _ = MergedWavLM(base, {})(wavs, lens)
    assert torch.equal(plain, setup1)
    merged, _ = MergedWavLM(base, {"ASR": asr, "SER": ser})(wavs, lens)
    assert (merged - plain).abs().max() > 1e-3
    # a ΔW only in group 0 (the weight-normed positional conv included) must already move hidden state 0
    only_pos = {k: (v if k.startswith("encoder.pos_conv_embed") else torch.zeros_like(v)) for k, v in asr.items()}
    h, _ = MergedWavLM(base, {"ASR": only_pos})(wavs, lens)
    assert (h[0] - plain[0]).abs().max() > 1e-4


def test_folded_export_reproduces_merged_hidden_states(tiny, tmp_path):
    base, _, asr, ser = tiny
    m = MergedWavLM(base, {"ASR": asr, "SER": ser})
    with torch.no_grad():
        m.lambdas.lam.copy_(torch.linspace(-0.3, 1.2, 10).view(2, 5))
    ws, head = WeightedLayerSum(4), SERHead(32, 16)
    out = export_folded(m, tmp_path / "folded", {"weighted_sum": ws, "ser_head": head}, {"hidden": 16})
    wavs, lens = _wavs()
    with torch.no_grad():
        ref, _ = m(wavs, lens)
        folded = WavLMModel.from_pretrained(out).eval()
        got, _ = run_wavlm(folded, wavs, lens)
    assert (ref - got).abs().max().item() <= 1e-5
    info = json.loads((out / "merge_info.json").read_text())
    assert info["lambda"]["SER"] == pytest.approx(torch.linspace(-0.3, 1.2, 10)[5:].tolist())
    ws2, head2 = WeightedLayerSum(4), SERHead(32, 16)
    load_downstream(out, {"weighted_sum": ws2, "ser_head": head2})
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), head2.state_dict().values()))
    assert not list(tmp_path.glob(".*tmp*"))


def test_folded_export_rebuilds_a_non_default_head_from_downstream_json(tiny, tmp_path):
    """Two projection layers, mean+std pooling, 3 classes, CNN output and layer norm in the α sum: the loader
    builds exactly these modules from downstream.json and gives the probabilities of the exported ones."""
    base, _, asr, _ = tiny
    m = MergedWavLM(base, {"ASR": asr}, lambda_mode="global", lambda_init=0.3)
    torch.manual_seed(4)
    ws = WeightedLayerSum(4, include_cnn=True, layer_norm=True)
    head = SERHead(32, 8, num_classes=3, pooling="mean_std", num_proj_layers=2).eval()
    with torch.no_grad():
        ws.weights.copy_(torch.randn(5))
    out = export_folded(m, tmp_path / "folded", {"weighted_sum": ws, "ser_head": head},
                        {"classes": ["a", "b", "c"], "normalize_wav": True})
    cfg = json.loads((out / "downstream.json").read_text())
    assert cfg["weighted_sum"] == {"num_layers": 4, "include_cnn": True, "layer_norm": True}
    assert cfg["ser_head"] == {"input_size": 32, "hidden_size": 8, "num_classes": 3, "pooling": "mean_std",
                               "dropout": 0.1, "num_proj_layers": 2, "head_type": "frame_mlp"}
    rec = load_folded_export(out)
    assert rec.modules["ser_head"].config == head.config and rec.classes == ["a", "b", "c"]
    wavs, lens = _wavs()
    with torch.no_grad():
        hidden, mask = m(wavs, lens)
        want = torch.softmax(head(ws(hidden), mask), dim=-1)
    got, _ = rec.forward(wavs, lens)
    assert (got - want).abs().max().item() <= 1e-5
    cfg["ser_head"]["num_proj_layers"] = 1  # a configuration that does not fit the weights is named
    (out / "downstream.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"downstream.safetensors: 'ser_head' does not fit .*downstream.json"):
        load_folded_export(out)


def test_mismatched_vectors_name_the_keys(tiny, tmp_path):
    base, state, asr, _ = tiny
    deeper = WavLMModel.from_pretrained(make_tiny_wavlm(tmp_path / "deep", num_layers=5)).state_dict()
    with pytest.raises(DataError, match=r"unexpected keys: .*encoder\.layers\.4\."):
        MergedWavLM(base, {"ASR": deeper})
    wider = WavLMModel.from_pretrained(make_tiny_wavlm(tmp_path / "wide", hidden_size=48)).state_dict()
    expected = r"shape mismatches: .*encoder\.layers\.0\.attention\.k_proj\.weight: vector \(48, 48\) vs base \(32, 32\)"
    with pytest.raises(DataError, match=expected):
        MergedWavLM(base, {"SER": wider})
    partial = {k: v for k, v in asr.items() if k != "encoder.layers.2.attention.q_proj.weight"}
    with pytest.raises(DataError, match=r"'ASR'.*missing keys: encoder\.layers\.2\.attention\.q_proj\.weight"):
        MergedWavLM(base, {"ASR": partial})


def test_weighted_sum_alpha_is_a_distribution_and_eq5():
    ws = WeightedLayerSum(3)
    with torch.no_grad():
        ws.weights.copy_(torch.tensor([0.0, math.log(2.0), math.log(5.0)]))
    assert ws.alpha().tolist() == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    h = torch.stack([torch.full((1, 2, 3), float(v)) for v in (100.0, 1.0, 2.0, 4.0)])  # index 0 = CNN, skipped
    assert ws(h)[0, 0, 0].item() == pytest.approx(1 / 8 + 2 * 2 / 8 + 4 * 5 / 8)


def test_ser_head_ignores_padding():
    torch.manual_seed(0)
    head = SERHead(4, 8, num_classes=3, pooling="mean_std", dropout=0.0).eval()
    x = torch.randn(1, 5, 4)
    padded = torch.cat([x, 50 * torch.randn(1, 3, 4)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    assert torch.allclose(head(x, torch.ones(1, 5, dtype=torch.bool)), head(padded, mask), atol=1e-6)


def test_soft_cross_entropy_hand_computed():
    logits = torch.tensor([[math.log(1.0), math.log(3.0)], [0.0, 0.0]])
    soft = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    # sample 1: p = (1/4, 3/4); sample 2: p = (1/2, 1/2)
    l1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    l2 = -math.log(0.5)
    assert soft_cross_entropy(logits, soft).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    w = torch.tensor([2.0, 0.5])
    l1w = -(2.0 * 0.25 * math.log(0.25) + 0.5 * 0.75 * math.log(0.75))
    l2w = -2.0 * math.log(0.5)
    assert soft_cross_entropy(logits, soft, w).item() == pytest.approx((l1w + l2w) / 2, rel=1e-6)


def test_effective_number_weights():
    counts = [10, 30, 0]
    beta = 0.9
    e = [(1 - beta ** 10) / (1 - beta), (1 - beta ** 30) / (1 - beta)]
    raw = [1 / e[0], 1 / e[1]]
    expect = [2 * raw[0] / sum(raw), 2 * raw[1] / sum(raw), 0.0]
    assert effective_number_weights(counts, beta).tolist() == pytest.approx(expect, rel=1e-6)
    # β -> 1 is inverse frequency: weights 3:1 for counts 10:30, summing to the 2 present classes
    assert effective_number_weights(counts, 1.0).tolist() == pytest.approx([1.5, 0.5, 0.0])
    loss = ClassBalancedSoftCE(3, beta=1.0, counts=counts)
    assert loss.class_weights.tolist() == pytest.approx([1.5, 0.5, 0.0])
