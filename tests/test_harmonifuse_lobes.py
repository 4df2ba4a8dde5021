"""HarmoniFuse model pieces: gated encoder fusion, prompt-adaptive LM fusion, adapter and the speech LM."""
import math

import pytest
import torch

from lobes.harmonifuse.dynamic_fusion import PromptAdaptiveFusion
EMOTIONS = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
from lobes.errors import DataError
from lobes.harmonifuse.gated_encoder_fusion import GatedEncoderFusion
from lobes.harmonifuse.speech_lm import CharTokenizer, SpeechAdapter, SpeechLM, to_frame_mask


# ------------------------------------------------------------------------------------ gated encoder fusion
def test_encoder_fusion_init_is_uniform_mean_and_gate_identity():
    torch.manual_seed(0)
    f = GatedEncoderFusion(num_layers=4, hidden_size=8, tasks=("asr", "ser"))
    hs = torch.randn(5, 2, 3, 8)  # index 0 = CNN output, dropped by default
    for task in ("asr", "ser"):
        w = f.layer_weights(task)
        assert w.shape == (4,)
        assert torch.allclose(w, torch.full((4,), 0.25))
        assert torch.equal(f.gate_values(task), torch.ones(8))
    assert torch.allclose(f(hs, "asr"), hs[1:].mean(0), atol=1e-6)
    # include_cnn: 5 entries weighted, CNN output included
    g = GatedEncoderFusion(4, 8, include_cnn=True)
    assert torch.allclose(g(hs, 0), hs.mean(0), atol=1e-6)
    # list input works like the stacked tensor
    assert torch.allclose(f(list(hs), "ser"), hs[1:].mean(0), atol=1e-6)


def test_encoder_fusion_gate_and_weights_by_hand():
    f = GatedEncoderFusion(2, 2, tasks=("asr", "ser"))
    hs = torch.tensor([[[[9.0, 9.0]]], [[[1.0, 2.0]]], [[[3.0, 6.0]]]])  # [3, 1, 1, 2]
    with torch.no_grad():
        f.layer_logits[1] = torch.tensor([0.0, math.log(3.0)])   # softmax -> [0.25, 0.75]
        f.gate_logits[1] = torch.tensor([math.log(3.0), 0.0])    # 2*sigmoid -> [1.5, 1.0]
    w = f.layer_weights("ser")
    assert torch.allclose(w, torch.tensor([0.25, 0.75]))
    # fused = [0.25*1 + 0.75*3, 0.25*2 + 0.75*6] = [2.5, 5.0]; gated = [3.75, 5.0]
    assert torch.allclose(f(hs, "ser"), torch.tensor([[[3.75, 5.0]]]))
    # task asr untouched: plain mean [2, 4]
    assert torch.allclose(f(hs, "asr"), torch.tensor([[[2.0, 4.0]]]))
    # per-sample tasks in one batch give each sample its own task's fusion
    hs2 = hs.expand(3, 2, 1, 2)
    out = f(hs2, ["ser", "asr"])
    assert torch.allclose(out[0], torch.tensor([[3.75, 5.0]])) and torch.allclose(out[1], torch.tensor([[2.0, 4.0]]))
    nogate = GatedEncoderFusion(2, 2, gate="none")
    assert nogate.gate_logits is None and torch.equal(nogate.gate_values("asr"), torch.ones(2))


def test_encoder_fusion_rejects_wrong_layer_count_and_task():
    f = GatedEncoderFusion(4, 8)
    with pytest.raises(DataError, match="4 layers"):
        f(torch.randn(7, 1, 2, 8), "asr")
    with pytest.raises(DataError, match="unknown task 'sv'"):
        f(torch.randn(5, 1, 2, 8), "sv")


def test_encoder_fusion_learns_task_specific_layers():
    """ASR target = transformer layer 1, SER target = layer 3: α^asr peaks at layer 1, α^ser at layer 3."""
    torch.manual_seed(0)
    f = GatedEncoderFusion(4, 8, tasks=("asr", "ser"))
    opt = torch.optim.Adam(f.parameters(), lr=0.1)
    for _ in range(60):
        hs = torch.randn(5, 4, 6, 8)
        loss = ((f(hs, "asr") - hs[1]) ** 2).mean() + ((f(hs, "ser") - hs[3]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for task, layer in (("asr", 1), ("ser", 3)):
        w = f.layer_weights(task)
        assert abs(w.sum().item() - 1.0) < 1e-6 and (w >= 0).all()
        assert int(w.argmax()) == layer - 1  # weight index i = transformer layer i+1
        assert w[layer - 1] > 0.8
    assert not torch.allclose(f.layer_weights("asr"), f.layer_weights("ser"))


# ------------------------------------------------------------------------------------ prompt-adaptive fusion
def _set_ffn(f, w1, w2):
    with torch.no_grad():
        f.ffn[0].weight.copy_(torch.tensor(w1))
        f.ffn[0].bias.zero_()
        f.ffn[2].weight.copy_(torch.tensor(w2))


def test_dynamic_fusion_weights_by_hand():
    f = PromptAdaptiveFusion(num_layers=2, hidden_size=2, tasks=("asr", "ser"), ffn_hidden=1)
    _set_ffn(f, [[1.0, 0.0]], [[2.0]])
    with torch.no_grad():
        f.layer_bias[0] = torch.tensor([0.5, 0.0])
    # one sample, two frames; layer means: l1 = [3, 1], l2 = [0, 2]
    hs = torch.tensor([[[[2.0, 0.0], [4.0, 2.0]]], [[[0.0, 3.0], [0.0, 1.0]]]])
    # LayerNorm of a 2-vector [a, b] is ±[1, -1]: l1 -> [1, -1], l2 -> [-1, 1]  (eps 1e-5 is negligible)
    s1, s2 = 0.5 + 2 * math.tanh(1.0), 0.0 + 2 * math.tanh(-1.0)
    e1, e2 = math.exp(s1), math.exp(s2)
    fused, w = f(hs, "asr")
    assert torch.allclose(w, torch.tensor([[e1 / (e1 + e2), e2 / (e1 + e2)]]), atol=1e-4)
    assert torch.allclose(fused, w[0, 0] * hs[0] + w[0, 1] * hs[1], atol=1e-6)
    # task ser has b = 0: s = [2 tanh 1, -2 tanh 1]
    _, w_ser = f(hs, "ser")
    e = math.exp(4 * math.tanh(1.0))
    assert torch.allclose(w_ser, torch.tensor([[e / (e + 1), 1 / (e + 1)]]), atol=1e-4)


def test_dynamic_fusion_depends_on_input_static_does_not():
    torch.manual_seed(0)
    dyn = PromptAdaptiveFusion(3, 8, ("asr", "ser"), ffn_hidden=4)
    sta = PromptAdaptiveFusion(3, 8, ("asr", "ser"), mode="static")
    # at init the FFN output layer is zero: dynamic == static == uniform
    x1, x2 = torch.randn(3, 1, 5, 8), torch.randn(3, 1, 5, 8) * 3 + 1
    assert torch.allclose(dyn(x1, "asr")[1], torch.full((1, 3), 1 / 3))
    torch.nn.init.normal_(dyn.ffn[2].weight)
    with torch.no_grad():
        sta.layer_bias[0] = torch.tensor([1.0, 0.0, -1.0])
    w1, w2 = dyn(x1, "asr")[1], dyn(x2, "asr")[1]
    assert (w1 - w2).abs().max() > 1e-3
    for w in (w1, w2):
        assert abs(w.sum().item() - 1) < 1e-6 and (w >= 0).all()
    s1, s2 = sta(x1, "asr")[1], sta(x2, "asr")[1]
    assert torch.equal(s1, s2)
    assert torch.allclose(s1[0], torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0))
    last = PromptAdaptiveFusion(3, 8, mode="last")
    fused, w = last(x1, "ser")
    assert torch.equal(fused, x1[2]) and torch.equal(w, torch.tensor([[0.0, 0.0, 1.0]]))


def test_dynamic_fusion_pool_mask_ignores_padding():
    torch.manual_seed(0)
    f = PromptAdaptiveFusion(3, 4, ("asr",), ffn_hidden=4)
    torch.nn.init.normal_(f.ffn[2].weight)
    x = torch.randn(3, 1, 4, 4)
    padded = torch.cat([x, 100 * torch.randn(3, 1, 2, 4)], dim=2)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    w_ref = f.layer_weights(x, "asr")
    assert torch.allclose(f.layer_weights(padded, "asr", mask), w_ref, atol=1e-6)
    assert not torch.allclose(f.layer_weights(padded, "asr"), w_ref, atol=1e-3)


# ------------------------------------------------------------------------------------ adapter, tokenizer
def test_speech_adapter_stacks_frames_and_masks_padding():
    torch.manual_seed(0)
    a = SpeechAdapter(in_dim=3, out_dim=5, stack=2)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    y, m = a(x, mask)
    assert y.shape == (2, 3, 5)
    assert m.tolist() == [[True, True, True], [True, True, False]]  # ceil(5/2)=3, ceil(3/2)=2
    # stacked frame 1 of utterance 2 = [frame 2, zeros]: padding values never leak in
    x2 = x.clone()
    x2[1, 3:] = 1e4
    assert torch.allclose(a(x2, mask)[0][1, :2], y[1, :2])
    expect = a.proj(torch.cat([x[1, 2], torch.zeros(3)]))
    assert torch.allclose(y[1, 1], expect, atol=1e-6)


def test_to_frame_mask_accepts_mask_counts_and_relative_lengths():
    assert to_frame_mask(torch.tensor([4, 2]), 4).tolist() == [[True] * 4, [True, True, False, False]]
    assert to_frame_mask(torch.tensor([1.0, 0.5]), 4).tolist() == [[True] * 4, [True, True, False, False]]
    m = torch.tensor([[True, False]])
    assert torch.equal(to_frame_mask(m, 2), m)


def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer()
    assert len(tok) == 64
    ids = tok.encode("HI there")
    assert ids == [tok.index[c] for c in "HI there"] and tok.decode(ids + [tok.eos_token_id]) == "HI there"
    assert tok.encode("é") == [tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    assert CharTokenizer.from_pretrained(tmp_path).tokens == tok.tokens


# ------------------------------------------------------------------------------------ speech LM
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm
    root = tmp_path_factory.mktemp("hf")
    return make_tiny_wavlm(root / "wavlm"), make_tiny_lm(root / "lm")


class ToyEncoder(torch.nn.Module):
    """Deterministic stand-in for WavLM (80-sample frames, 3 layers): keeps padding tests exact."""
    num_layers, hidden_size = 3, 16

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(80 if i == 0 else 16, 16) for i in range(4))

    def forward(self, wavs, wav_lens):
        b, n = wavs.shape
        h = wavs[:, : n // 80 * 80].reshape(b, n // 80, 80)
        hs = []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            hs.append(h)
        return torch.stack(hs), torch.round(wav_lens * (n // 80)).long()


def test_speech_lm_last_fusion_equals_plain_lm(tiny_dirs):
    """lm_fusion='last': logits are exactly the LM's own logits on [BOS][prompt][speech][target]."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1]), lm_fusion="last").eval()
    wavs, lens = torch.randn(1, 800), torch.tensor([1.0])
    out = m(wavs, lens, "asr", ["HI"])
    speech, smask = m.encode_speech(wavs, lens, "asr")
    assert smask.sum().item() == 3  # 10 frames stacked by 4 -> ceil(10/4)
    tok = m.tokenizer
    prefix = m._prefixes(speech, smask, "asr")[0]
    assert prefix.shape[0] == 1 + 4 + 3  # BOS + 4 prompt vectors + 3 speech vectors
    seq = torch.cat([prefix, m.lm.get_input_embeddings()(torch.tensor(tok.encode("HI")))])[None]
    ref = m.lm(inputs_embeds=seq).logits[0, 7:10]  # positions K-1.. predict 'H', 'I', EOS
    assert torch.allclose(out.logits[0], ref, atol=1e-5)
    assert out.target_ids[0].tolist() == tok.encode("HI") + [tok.eos_token_id]
    expected_loss = torch.nn.functional.cross_entropy(ref, out.target_ids[0])
    assert torch.allclose(out.loss, expected_loss, atol=1e-5)


def test_speech_lm_batch_padding_invariance(tiny_dirs):
    """A padded batch gives each utterance the same loss terms as running it alone."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1])).eval()
    torch.nn.init.normal_(m.lm_fusion.ffn[2].weight)  # make α input-dependent
    wavs = torch.randn(2, 1600)
    lens = torch.tensor([1.0, 0.5])
    targets = ["HELLO THERE", "OK"]
    out = m(wavs, lens, "asr", targets)
    for b in range(2):
        n = int(lens[b] * 1600)
        single = m(wavs[b:b + 1, :n], torch.tensor([1.0]), "asr", [targets[b]])
        k = single.logits.shape[1]
        assert torch.allclose(out.logits[b, :k], single.logits[0], atol=1e-4)
        assert torch.allclose(out.lm_weights[b], single.lm_weights[0], atol=1e-5)
    assert (out.target_ids[1, 3:] == -100).all()  # "OK" + EOS = 3 tokens


def test_speech_lm_wavlm_overfits_and_generates(tiny_dirs):
    from lobes.wavlm_encoder import WavLMEncoder
    torch.manual_seed(0)
    m = SpeechLM(WavLMEncoder(str(tiny_dirs[0]), freeze=True), str(tiny_dirs[1]), freeze_lm=False)
    wavs, lens = torch.randn(2, 8000), torch.tensor([1.0, 0.7])
    targets = {"asr": ["HELLO", "WORLD"], "ser": ["Anger", "Sadness"]}
    first = {t: m(wavs, lens, t, targets[t]).loss.item() for t in targets}
    assert all(math.isfinite(v) for v in first.values())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for step in range(60):
        task = "asr" if step % 2 == 0 else "ser"  # batch-interleaved
        out = m(wavs, lens, task, targets[task])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        last = {t: m(wavs, lens, t, targets[t]).loss.item() for t in targets}
    for t in targets:
        assert last[t] < 0.5 * first[t], (t, first[t], last[t])
    assert m.generate(wavs, lens, "asr", max_len=12) == ["HELLO", "WORLD"]
    assert m.generate(wavs, lens, "ser", max_len=12) == ["Anger", "Sadness"]
    fw = m.fusion_weights("ser")
    for key in ("encoder", "lm_static", "lm_dynamic_mean"):
        assert abs(fw[key].sum().item() - 1) < 1e-5 and (fw[key] >= 0).all()
    assert fw["encoder"].shape == (4,) and fw["lm_static"].shape == (4,) and fw["encoder_gate"].shape == (32,)
    m.reset_fusion_stats()
    assert m.fusion_weights("asr")["lm_dynamic_mean"] is None


def test_speech_lm_frozen_lm_and_classify_mode(tiny_dirs):
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1]), ser_mode="classify", freeze_lm=True, emotions=EMOTIONS)
    lm_before = {k: v.clone() for k, v in m.lm.state_dict().items()}
    prompts_before = m.prompts.detach().clone()
    wavs, lens = torch.randn(2, 1600), torch.tensor([1.0, 0.8])
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):
        task, tg = ("ser", ["Fear", "Neutral"]) if step % 2 else ("asr", ["AB", "CD"])
        out = m(wavs, lens, task, tg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.logits.shape == (2, len(EMOTIONS))
    assert out.target_ids.tolist() == [EMOTIONS.index("Fear"), EMOTIONS.index("Neutral")]
    assert all(torch.equal(v, m.lm.state_dict()[k]) for k, v in lm_before.items())
    assert not torch.allclose(m.prompts, prompts_before)
    m.eval()
    assert m.generate(wavs, lens, "ser") == ["Fear", "Neutral"]
    with pytest.raises(DataError, match="not one of"):
        m(wavs, lens, "ser", ["Joy", "Fear"])
    with pytest.raises(DataError, match="needs targets"):
        m(wavs, lens, "asr")
