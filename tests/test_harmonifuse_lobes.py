"""HarmoniFuse model pieces: gated encoder fusion, prompt-adaptive LM fusion, adapter and the speech LM."""
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from toy_encoder import ToyEncoder  # tests/ is on sys.path (pytest rootdir conftest)
from lobes.errors import DataError
from lobes.harmonifuse.dynamic_fusion import PromptAdaptiveFusion, clamp_inward, simplex_weights
from lobes.harmonifuse.gated_encoder_fusion import GatedEncoderFusion
from lobes.harmonifuse.adapter import SpeechAdapter, to_frame_mask
from lobes.harmonifuse.generation import left_padded, pad_prefixes
from lobes.harmonifuse.lm_loading import CharTokenizer
from lobes.harmonifuse.speech_lm import SpeechLM

EMOTIONS = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]


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
    assert f.layer_bias.shape == (2, 1)  # b_{τ,l} of layers 1..L-1 only: the last one's weight is 1 − Σ
    with torch.no_grad():
        f.layer_bias[0] = torch.tensor([0.5])
    # one sample, two frames; layer means: l1 = [3, 1], l2 = [0, 2]
    hs = torch.tensor([[[[2.0, 0.0], [4.0, 2.0]]], [[[0.0, 3.0], [0.0, 1.0]]]])
    # LayerNorm of a 2-vector [a, b] is ±[1, -1]: l1 -> [1, -1] (eps 1e-5 is negligible); w_1 = b + 2 tanh(1)
    w1 = 0.5 + 2 * math.tanh(1.0)
    fused, w = f(hs, "asr")
    assert torch.allclose(w, torch.tensor([[w1, 1 - w1]]), atol=1e-4)   # β_2 = 1 − w_1: here < 0
    assert torch.allclose(fused, hs[1] + w1 * (hs[0] - hs[1]), atol=1e-4)  # h_L + w_1 (h_1 − h_L)
    # task ser has b = 0: w_1 = 2 tanh 1
    _, w_ser = f(hs, "ser")
    assert torch.allclose(w_ser, torch.tensor([[2 * math.tanh(1.0), 1 - 2 * math.tanh(1.0)]]), atol=1e-4)


def test_dynamic_fusion_starts_as_the_last_layer_exactly():
    """b = 0 and a zero FFN output: β one-hot on the last layer, the fused states are h_L bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5, 8) * torch.tensor([1.0, 3.0, 10.0, 0.5])[:, None, None, None]
    for mode in ("dynamic", "static"):
        f = PromptAdaptiveFusion(4, 8, ("asr", "ser"), ffn_hidden=4, mode=mode)
        for task in ("asr", "ser"):
            fused, w = f(x, task)
            assert torch.equal(w, torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2)) and torch.equal(fused, x[3])
            assert torch.equal(f.static_weights(task), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    # and the weights still learn at init: each layer's coefficient gets the gradient <g, h_l − h_L>
    f = PromptAdaptiveFusion(4, 8, ("asr",), ffn_hidden=4, mode="static")
    g = torch.randn(2, 5, 8)
    (f(x, "asr")[0] * g).sum().backward()
    expected = torch.stack([((x[i] - x[3]) * g).sum() for i in range(3)])
    assert torch.allclose(f.layer_bias.grad[0], expected, atol=1e-4) and expected.abs().min() > 1e-2


def test_simplex_fusion_weights_by_hand_and_always_in_the_simplex():
    """form simplex: β = ([w]_+, 1) / (1 + Σ [w]_+), ≥ 0 and summing to 1 for any parameters and input."""
    w = torch.tensor([[0.5, -1.0, 2.0]])
    assert torch.allclose(simplex_weights(w), torch.tensor([[0.5, 0.0, 2.0, 1.0]]) / 3.5, atol=1e-7)
    torch.manual_seed(0)
    for mode in ("dynamic", "static"):
        f = PromptAdaptiveFusion(4, 8, ("asr", "ser"), ffn_hidden=4, mode=mode, form="simplex")
        with torch.no_grad():
            for p in f.parameters():
                p.normal_(0.0, 3.0)
        for task in ("asr", "ser"):
            x = torch.randn(4, 6, 5, 8) * 5
            fused, b = f(x, task)
            assert b.shape == (6, 4) and b.min() >= 0 and (b.sum(-1) - 1).abs().max() < 1e-6
            assert (b[:, :3] > 0).any() and (b[:, :3] == 0).any()  # both sides of the clamp are exercised
            assert torch.allclose(fused, torch.einsum("lbtd,bl->btd", x, b), atol=1e-5)
            s = f.static_weights(task)
            assert s.min() >= 0 and abs(s.sum().item() - 1) < 1e-6
    with pytest.raises(DataError, match="lm_fusion_form must be one of \\('residual', 'simplex'\\), got 'softmax'"):
        PromptAdaptiveFusion(4, 8, form="softmax")


def test_simplex_fusion_starts_one_hot_and_every_coefficient_learns():
    """At init β = e_L and the fused states are h_L bit for bit; the layer coefficients (b_τ and the FFN's output
    layer) get the residual form's gradient: ∂/∂b_l = <g, h_l − h_L>, ∂/∂W2 = Σ_l <g, h_l − h_L> tanh(W1 LN(p_l) + c1)."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5, 8) * torch.tensor([1.0, 3.0, 10.0, 0.5])[:, None, None, None]
    g = torch.randn(2, 5, 8)
    for mode in ("static", "dynamic"):  # dynamic last: its FFN is checked below
        f = PromptAdaptiveFusion(4, 8, ("asr", "ser"), ffn_hidden=4, mode=mode, form="simplex")
        fused, w = f(x, "ser")
        assert torch.equal(w, torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2)) and torch.equal(fused, x[3])
        assert torch.equal(f.static_weights("asr"), torch.tensor([0.0, 0.0, 0.0, 1.0]))
        (fused * g).sum().backward()
        per_sample = torch.stack([((x[i] - x[3]) * g).sum(dim=(1, 2)) for i in range(3)], dim=1)  # [B, L-1]
        assert torch.allclose(f.layer_bias.grad[1], per_sample.sum(0), atol=1e-4)
        assert per_sample.sum(0).abs().min() > 1e-2 and f.layer_bias.grad[0].abs().max() == 0  # only task ser ran
    pooled = torch.nn.functional.layer_norm(x.mean(dim=2)[:3], (8,))  # [L-1, B, D]
    hidden = torch.tanh(f.ffn[0](pooled))                             # [L-1, B, H]
    expected = torch.einsum("bl,lbh->h", per_sample, hidden)
    assert torch.allclose(f.ffn[2].weight.grad[0], expected, atol=1e-4) and expected.abs().min() > 1e-3


def test_clamp_inward_passes_the_gradient_that_leaves_the_dead_zone():
    """[w]_+: w ≥ 0 passes the gradient (w = 0 included, as torch's clamp); w < 0 only a negative one (it raises w)."""
    w = torch.tensor([-1.0, -1.0, 0.5, 0.0, 0.0], requires_grad=True)
    out = clamp_inward(w)
    assert out.tolist() == [0.0, 0.0, 0.5, 0.0, 0.0]
    out.backward(torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0]))
    assert w.grad.tolist() == [0.0, -2.0, 3.0, 4.0, -5.0]


def test_dynamic_fusion_depends_on_input_static_does_not():
    torch.manual_seed(0)
    dyn = PromptAdaptiveFusion(3, 8, ("asr", "ser"), ffn_hidden=4)
    sta = PromptAdaptiveFusion(3, 8, ("asr", "ser"), mode="static")
    # at init the FFN output layer is zero: dynamic == static == the last layer
    x1, x2 = torch.randn(3, 1, 5, 8), torch.randn(3, 1, 5, 8) * 3 + 1
    assert torch.equal(dyn(x1, "asr")[1], torch.tensor([[0.0, 0.0, 1.0]]))
    torch.nn.init.normal_(dyn.ffn[2].weight)
    with torch.no_grad():
        sta.layer_bias[0] = torch.tensor([1.0, 0.5])
    w1, w2 = dyn(x1, "asr")[1], dyn(x2, "asr")[1]
    assert (w1 - w2).abs().max() > 1e-3
    for w in (w1, w2):
        assert abs(w.sum().item() - 1) < 1e-6
    s1, s2 = sta(x1, "asr")[1], sta(x2, "asr")[1]
    assert torch.equal(s1, s2)
    assert torch.allclose(s1[0], torch.tensor([1.0, 0.5, -0.5]))
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


def test_speech_lm_last_fusion_equals_plain_lm(tiny_dirs):
    """lm_fusion='last': logits are exactly the LM's own logits on [BOS][prompt words][speech][target]."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1]), fusion={"mode": "last"}).eval()
    assert m.lm_fusion.layer_bias is None and not list(m.lm_fusion.parameters())  # nothing DDP could miss
    wavs, lens = torch.randn(1, 800), torch.tensor([1.0])
    out = m(wavs, lens, "asr", ["HI"])
    speech, smask = m.encode_speech(wavs, lens, "asr")
    assert smask.sum().item() == 3  # 10 frames stacked by 4 -> ceil(10/4)
    tok = m.tokenizer
    prompt_ids = tok.encode("Transcribe the audio.")
    assert m.prompt_ids["asr"] == prompt_ids and len(prompt_ids) == 21 and m.prompts is None
    prefix, pmask = m.prefix_embeddings(speech, smask, "asr")
    K = 1 + 21 + 3  # BOS + the prompt's 21 character tokens + 3 speech vectors
    assert prefix.shape[:2] == (1, K) and pmask.tolist() == [[True] * K]
    prefix = prefix[0]
    emb = m.lm.get_input_embeddings()
    # the text prompt reaches the LM as the token embeddings of its words, right after BOS
    assert torch.equal(prefix[: 1 + 21], emb(torch.tensor([tok.bos_token_id] + prompt_ids)))
    seq = torch.cat([prefix, emb(torch.tensor(tok.encode("HI")))])[None]
    ref = m.lm(inputs_embeds=seq).logits[0, K - 1:K + 2]  # positions K-1.. predict 'H', 'I', EOS
    assert torch.allclose(out.logits[0], ref, atol=1e-5)
    assert out.target_ids[0].tolist() == tok.encode("HI") + [tok.eos_token_id]
    expected_loss = torch.nn.functional.cross_entropy(ref, out.target_ids[0])
    assert torch.allclose(out.loss, expected_loss, atol=1e-5)
    # the SER prompt differs: another instruction, other tokens
    assert m.prompt_ids["ser"] == tok.encode("Which emotion does the speaker express?")


PRETRAINED_LM = Path(__file__).resolve().parents[1] / "tools/fixtures/tiny_lm_pretrained"


def _fused_text_logits(m, ids, weights=None):
    """Text-only pass through the speech LM's fusion path: decoder, layer weights of the text, fused state, head."""
    hidden, _ = m.run_decoder(m.lm.get_input_embeddings()(ids))
    w = m.layer_alpha(hidden, "asr", torch.ones(ids.shape, dtype=torch.bool)) if weights is None else weights
    return m.hf_lm.get_output_embeddings()(m.fuse(m.layer_states(hidden), w)), w


@pytest.mark.parametrize("mode,form", [("dynamic", "residual"), ("static", "residual"), ("dynamic", "simplex"),
                                       ("static", "simplex")])
def test_lm_fusion_starts_as_the_pretrained_lm(mode, form):
    """At init the LM-layer fusion is the identity: text-only logits (and the loss on a sentence the tiny LM was
    pretrained on) equal the plain pretrained LM's. An even average of the layers (the earlier softmax init)
    raises that loss (2.58 -> 2.75 nats/token on this sentence)."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), {"source": str(PRETRAINED_LM), "mode": "lora",
                                "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])},
                 fusion={"mode": mode, "form": form}).eval()
    assert m.lm_fusion.form == form
    tok = m.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("Stop telling me what to do.")])
    with torch.no_grad():
        plain = m.lm(input_ids=ids).logits
        fused, w = _fused_text_logits(m, ids)
        uniform, _ = _fused_text_logits(m, ids, torch.full((1, 4), 0.25))
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    assert torch.allclose(fused, plain, atol=1e-5)
    ce = lambda lg: torch.nn.functional.cross_entropy(lg[0, :-1], ids[0, 1:]).item()  # noqa: E731
    assert abs(ce(fused) - ce(plain)) < 1e-5 and ce(uniform) > ce(plain) + 0.1
    # the whole speech LM: logits of [BOS][prompt][speech][target] equal the plain LM's on the same sequence
    wavs, lens = torch.randn(1, 800), torch.tensor([1.0])
    out = m(wavs, lens, "asr", ["Look at this."])
    prefix, _ = m.prefix_embeddings(*m.encode_speech(wavs, lens, "asr"), "asr")
    seq = torch.cat([prefix[0], m.lm.get_input_embeddings()(torch.tensor(tok.encode("Look at this.")))])[None]
    K = prefix.shape[1]
    with torch.no_grad():
        ref = m.lm(inputs_embeds=seq).logits[0, K - 1:]
    assert torch.allclose(out.logits[0], ref, atol=1e-5)


@pytest.mark.parametrize("prompt_mode", ["text", "soft"])
def test_token_embeddings_are_looked_up_once_per_training_step(tiny_dirs, prompt_mode):
    """BOS, prompt words and targets go through the embedding in one call: a trainable embedding gets one dense
    [V, D] gradient per step, not one per lookup."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "full"}, prompts={"mode": prompt_mode}).train()
    calls = []
    emb = m.lm.get_input_embeddings()
    emb.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    out = m(torch.randn(2, 1600), torch.tensor([1.0, 0.5]), "asr", ["HELLO", "OK"])
    out.loss.backward()
    head = 1 + (21 if prompt_mode == "text" else 0)  # BOS + "Transcribe the audio." (soft: learned vectors)
    assert calls == [(head + 2 * 5,)]                 # + [2, N-1 = 5] teacher-forced target ids, flattened
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_soft_prompts_are_learned_vectors(tiny_dirs):
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1]), prompts={"mode": "soft", "num_tokens": 3}).eval()
    assert m.prompts.shape == (2, 3, 32) and m.prompt_ids == {}
    speech, smask = m.encode_speech(torch.randn(1, 800), torch.tensor([1.0]), "ser")
    prefix = m.prefix_embeddings(speech, smask, "ser")[0][0]
    assert prefix.shape[0] == 1 + 3 + 3 and torch.equal(prefix[1:4], m.prompts[1])
    with pytest.raises(DataError, match="task_prompts needs an instruction text for task\\(s\\) \\['ser'\\]"):
        SpeechLM(ToyEncoder(), str(tiny_dirs[1]), prompts={"texts": {"asr": "Transcribe."}})


def test_chunked_loss_equals_the_full_loss_and_its_gradients(tiny_dirs):
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "full"}).train()
    wavs, lens, tg = torch.randn(2, 1600), torch.tensor([1.0, 0.6]), ["HELLO THERE", "OK"]
    grads = []
    for chunk in (None, 5):
        m.loss_chunk_size = chunk
        m.zero_grad()
        out = m(wavs, lens, "asr", tg)
        out.loss.backward()
        grads.append((out.loss.detach(), out.logits, {n: p.grad.clone() for n, p in m.named_parameters()
                                                      if p.grad is not None}))
    (full, logits, g_full), (chunked, no_logits, g_chunk) = grads
    assert logits.shape == (2, 12, 64) and no_logits is None  # 15 target tokens in 3 chunks of 5: never [2, 12, 64]
    assert torch.allclose(full, chunked, atol=1e-6)
    assert g_full.keys() == g_chunk.keys() and "lm.lm_head.weight" in g_full or "lm.model.embed_tokens.weight" in g_full
    for n in g_full:
        assert torch.allclose(g_full[n], g_chunk[n], atol=1e-5), n
    with pytest.raises(DataError, match="loss_chunk_size"):
        SpeechLM(ToyEncoder(), str(tiny_dirs[1]), loss_chunk_size=0)


def test_logits_are_built_only_at_target_positions(tiny_dirs):
    """lm_head sees [B, N, D] (N = longest target + EOS), never the [B, S, D] sequence."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1])).eval()
    seen = []
    m.lm.get_output_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    out = m(torch.randn(2, 1600), torch.tensor([1.0, 0.5]), "asr", ["HELLO", "OK"])
    assert seen == [(2, 6, 32)]  # "HELLO" + EOS; the sequence is 1 + 21 + 5 + 5 = 32 positions long
    assert out.logits.shape == (2, 6, 64)


def test_speech_lm_batch_padding_invariance(tiny_dirs):
    """A padded batch gives each utterance the same loss terms as running it alone."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1]), speech={"gate": "channel"}).eval()
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


def prefix_list(m, speech, smask, task):
    """Per-utterance prefixes cut on the host, as SpeechLM built them before its padded tensors (the reference)."""
    head = torch.cat([m.lm.get_input_embeddings()(torch.tensor([m.tokenizer.bos_token_id])),
                      m.prompt_embeddings(task, "cpu")])
    return [torch.cat([head, speech[b, : int(smask[b].sum())]]) for b in range(speech.shape[0])]


def pad_left(prefixes):
    K = max(p.shape[0] for p in prefixes)
    embeds, attn = prefixes[0].new_zeros(len(prefixes), K, prefixes[0].shape[1]), torch.zeros(len(prefixes), K,
                                                                                          dtype=torch.bool)
    for b, p in enumerate(prefixes):
        embeds[b, K - p.shape[0]:], attn[b, K - p.shape[0]:] = p, True
    return embeds, attn


def test_padded_prefixes_equal_the_per_utterance_ones(tiny_dirs):
    """prefix_embeddings (right-padded, zero padding) and left_padded hold exactly the host-cut prefixes."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1])).eval()
    speech, smask = m.encode_speech(torch.randn(3, 1600), torch.tensor([0.5, 1.0, 0.3]), "ser")
    ref = prefix_list(m, speech, smask, "ser")
    assert [p.shape[0] for p in ref] == [1 + 39 + 3, 1 + 39 + 5, 1 + 39 + 2]  # 10, 20, 6 frames, stack 4
    right, rmask = m.prefix_embeddings(speech, smask, "ser")
    left, lmask = left_padded(right, rmask)
    want_left, want_lmask = pad_left(ref)
    assert torch.equal(left, want_left) and torch.equal(lmask, want_lmask)
    assert right.shape == (3, 45, 32) and rmask.sum(1).tolist() == [43, 45, 42]
    for b, p in enumerate(ref):
        assert torch.equal(right[b, : p.shape[0]], p) and not right[b, p.shape[0]:].any()


def reference_greedy(m, wavs, lens, task, max_len):
    """The hand-written greedy loop that SpeechLM.generate used before transformers' generate (the reference)."""
    from lobes.harmonifuse.dynamic_fusion import PromptAdaptiveFusion
    from lobes.harmonifuse.lm_loading import final_norm

    def lm_states(embeds, attn_mask, **kwargs):
        pos = (attn_mask.long().cumsum(1) - 1).clamp(min=0)
        if "past_key_values" in kwargs:
            pos = pos[:, -embeds.shape[1]:]
        out = m.lm(inputs_embeds=embeds, attention_mask=attn_mask.long(), position_ids=pos,
                   output_hidden_states=True, **kwargs)
        hs = out.hidden_states[1:]
        norm = final_norm(m.lm)
        return torch.stack([norm(h) for h in hs[:-1]] + [hs[-1]]), out

    with torch.no_grad():
        speech, smask = m.encode_speech(wavs, lens, task)
        embeds, attn = pad_left(prefix_list(m, speech, smask, task))
        states, out = lm_states(embeds, attn, use_cache=True)
        alpha = m.lm_fusion.layer_weights(states, task, attn)
        head, eos, B = m.lm.get_output_embeddings(), m.tokenizer.eos_token_id, embeds.shape[0]
        done = torch.zeros(B, dtype=torch.bool)
        result = [[] for _ in range(B)]
        last = PromptAdaptiveFusion.fuse(states[:, :, -1:], alpha)
        past = out.past_key_values
        for _ in range(max_len):
            tok = head(last[:, -1]).argmax(-1)
            for b in range(B):
                if not done[b] and tok[b].item() != eos:
                    result[b].append(tok[b].item())
            done |= tok == eos
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=torch.bool)], dim=1)
            states, out = lm_states(m.lm.get_input_embeddings()(tok[:, None]), attn, past_key_values=past,
                                    use_cache=True)
            past = out.past_key_values
            last = PromptAdaptiveFusion.fuse(states, alpha)
    return [m.tokenizer.decode(r) for r in result]


def test_speech_lm_wavlm_overfits_and_generates(tiny_dirs):
    from lobes.wavlm_encoder import WavLMEncoder
    torch.manual_seed(0)
    # soft prompts: the tiny random LM separates the tasks within 60 steps with them (text prompts: 1 of 4 wrong)
    m = SpeechLM(WavLMEncoder(str(tiny_dirs[0]), freeze=True), {"source": str(tiny_dirs[1]), "mode": "full"},
                 prompts={"mode": "soft"})
    wavs, lens = torch.randn(2, 8000), torch.tensor([1.0, 0.7])
    # untrained: long random outputs of different lengths, a demanding comparison with the old greedy loop
    torch.nn.init.normal_(m.lm_fusion.ffn[2].weight)  # input-dependent α
    m.eval()
    untrained = m.generate(wavs, lens, "asr", max_len=15)
    assert untrained == reference_greedy(m, wavs, lens, "asr", 15)
    assert sum(len(h) for h in untrained) > 10
    with torch.no_grad():
        m.lm_fusion.ffn[2].weight.zero_()  # back to the init the training below was tuned with
    m.train()
    targets = {"asr": ["HELLO", "WORLD"], "ser": ["Anger", "Sadness"]}
    first = {t: m(wavs, lens, t, targets[t]).loss.item() for t in targets}
    assert all(math.isfinite(v) for v in first.values())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for step in range(80):  # 60 with the earlier softmax LM fusion; the residual one needs 80 here (beam SER)
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
    for t in targets:
        assert m.generate(wavs, lens, t, max_len=12) == targets[t] == reference_greedy(m, wavs, lens, t, 12)
        assert m.generate(wavs, lens, t, max_len=12, num_beams=3) == targets[t]
    fw = m.fusion_weights("ser")
    for key in ("encoder", "lm_static", "lm_dynamic_mean"):  # the LM weights β may leave [0, 1]
        assert abs(fw[key].sum().item() - 1) < 1e-5 and (key != "encoder" or (fw[key] >= 0).all())
    assert fw["encoder"].shape == (4,) and fw["lm_static"].shape == (4,) and fw["encoder_gate"].shape == (32,)
    m.reset_fusion_stats()
    assert m.fusion_weights("asr")["lm_dynamic_mean"] is None


def test_simplex_fusion_trains_and_decodes_with_the_same_beta(tiny_dirs):
    """form simplex with an input-dependent β: generate equals the reference greedy loop (β of the left-padded
    prefix), and the teacher-forced β does not depend on the targets (only the prefix is pooled)."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1]), fusion={"form": "simplex"}).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.lm_fusion.ffn[2].weight)
        m.lm_fusion.layer_bias.normal_()
    wavs, lens = torch.randn(2, 1600), torch.tensor([1.0, 0.6])
    hyp = m.generate(wavs, lens, "asr", max_len=10)
    assert hyp == reference_greedy(m, wavs, lens, "asr", 10) and sum(len(h) for h in hyp) > 5
    with torch.no_grad():
        beta = m(wavs, lens, "asr", ["HELLO", "OK"]).lm_weights
        other = m(wavs, lens, "asr", ["X", "ANOTHER ONE"]).lm_weights
    assert torch.allclose(beta, other, atol=1e-6) and (beta - beta[:1]).abs().max() > 1e-3  # input-dependent
    assert beta.min() >= 0 and (beta.sum(-1) - 1).abs().max() < 1e-6 and beta[:, :3].max() > 0.01


def _markov_lm(m, rows, start, d=32):
    """Make m's LM a first-order Markov chain: every layer adds nothing (o_proj, down_proj = 0), so the final
    state is RMSNorm(embedding of the last input) and logits = W_head · that. Token i (or the start vector)
    gets basis direction e_i; column i of lm_head holds log-probabilities / sqrt(d), so next-token
    log-probabilities after token i are exactly rows[i] (dict token -> prob; the rest gets ~0)."""
    lm = m.lm
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.norm.weight.fill_(1.0)
        emb = torch.zeros(lm.config.vocab_size, d)
        head = torch.full((lm.config.vocab_size, d), 0.0)
        for col, (src, probs) in enumerate(rows.items()):
            if src != "start":
                emb[src, col] = 1.0
            logp = torch.full((lm.config.vocab_size,), -30.0)
            for tok, p in probs.items():
                logp[tok] = math.log(p)
            head[:, col] = logp / math.sqrt(d)
        lm.model.embed_tokens = torch.nn.Embedding.from_pretrained(emb, freeze=True)
        lm.lm_head = torch.nn.Linear(d, lm.config.vocab_size, bias=False)
        lm.lm_head.weight.copy_(head)
        lm.config.tie_word_embeddings = False
    return torch.eye(d)[list(rows).index("start")]


def test_beam_search_returns_the_best_scoring_hypothesis(tiny_dirs):
    """Greedy takes the locally best first token; beam search finds the sequence of highest total probability."""
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), str(tiny_dirs[1])).eval()
    tok = m.tokenizer
    A, B, C, D, E = (tok.index[c] for c in "ABCDE")
    eos = tok.eos_token_id
    # P(A)=.6, P(B)=.4; after A the best is EOS (.3), after B EOS (.95).
    # Greedy: "A" (.6 x .3 = .18). Best sequence: "B" (.4 x .95 = .38); all others <= .6 x .25 = .15.
    rows = {"start": {A: 0.6, B: 0.4}, A: {eos: 0.3, C: 0.25, D: 0.25, E: 0.2}, B: {eos: 0.95, C: 0.05},
            C: {eos: 1.0}, D: {eos: 1.0}, E: {eos: 1.0}}
    start = _markov_lm(m, rows, "start")
    # batch of 2: the second prefix is longer and ends in token C (then EOS for sure): checks left padding
    p1 = torch.randn(3, 32)
    p1[-1] = start
    p2 = torch.randn(5, 32)
    p2[-1] = m.lm.get_input_embeddings().weight[C]
    assert m.generate_from_prefixes(*pad_prefixes([p1, p2]), "asr", max_len=5) == ["A", ""]
    best = m.generate_from_prefixes(*pad_prefixes([p1, p2]), "asr", max_len=5, num_beams=2, length_penalty=0.0)
    assert best == ["B", ""]
    # exhaustive check of the claim "B is the best" over all sequences up to 3 tokens of the chain
    def prob(seq):
        p, state = 1.0, "start"
        for t in seq + [eos]:
            p *= rows[state].get(t, 0.0)
            state = t
        return p
    alphabet = [A, B, C, D, E]
    seqs = [[x] for x in alphabet] + [[x, y] for x in alphabet for y in alphabet]
    assert max(seqs, key=prob) == [B] and prob([B]) == pytest.approx(0.38)


def test_lora_wraps_target_modules_and_only_adapters_and_new_parts_train(tiny_dirs):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    m = SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "lora", "peft_config": cfg})
    wrapped = sorted(n for n, mod in m.lm.named_modules() if isinstance(mod, LoraLayer))
    assert wrapped == sorted(f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(4)
                             for p in ("q_proj", "v_proj"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith("lm.")}
    assert len(lora) == 4 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert {n.split(".")[0] for n in trainable - lora} == {"encoder", "encoder_fusion", "adapter", "lm_fusion"}
    base_before = {n: p.detach().clone() for n, p in m.lm.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    wavs, lens = torch.randn(2, 1600), torch.tensor([1.0, 0.8])
    for task, tg in (("asr", ["AB", "CD"]), ("ser", ["Fear", "Joy"])):
        opt.zero_grad()
        m(wavs, lens, task, tg).loss.backward()
        # every trainable parameter gets a gradient from every task's batch (DDP needs no unused-parameter search)
        assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
        opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in m.lm.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in m.lm.named_parameters() if "lora_B" in n)
    m.eval()
    assert all(isinstance(h, str) for h in m.generate(wavs, lens, "asr", max_len=4))
    with pytest.raises(DataError, match="lm_peft_config"):
        SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "lora"})


def test_other_peft_adapters_plug_in_through_lm_peft_config(tiny_dirs):
    """IA3 and DoRA configs work as lm_peft_config: only their vectors / matrices train in the LM, all get grads."""
    from peft import IA3Config, LoraConfig
    cases = ((IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
              4 * 3, "ia3_l"),
             (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), 4 * 2 * 3, "lora_"))
    for cfg, n_params, marker in cases:
        torch.manual_seed(0)
        m = SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "lora", "peft_config": cfg})
        m(torch.randn(2, 1600), torch.tensor([1.0, 0.8]), "asr", ["AB", "CD"]).loss.backward()
        lm = [n for n, p in m.named_parameters() if p.requires_grad and n.startswith("lm.")]
        assert len(lm) == n_params and all(marker in n for n in lm), (type(cfg).__name__, lm[:3])
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_bf16_lm_with_gradient_checkpointing_trains_and_decodes(tiny_dirs):
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "full", "dtype": "bfloat16",
                                "gradient_checkpointing": True})
    assert m.lm.dtype == torch.bfloat16 and m.lm.is_gradient_checkpointing
    assert m.adapter.proj[0].weight.dtype == torch.float32  # the new parts stay fp32
    wavs, lens = torch.randn(2, 1600), torch.tensor([1.0, 0.8])
    out = m(wavs, lens, "asr", ["AB", "CD"])
    assert out.logits.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert m.lm.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.bfloat16
    assert m.adapter.proj[0].weight.grad is not None
    m.eval()
    assert len(m.generate(wavs, lens, "asr", max_len=3)) == 2
    with pytest.raises(DataError, match="lm_dtype must be one of"):
        SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "dtype": "fp8"})


def test_unused_encoder_parameters_are_frozen(tiny_dirs, tmp_path):
    """masked_spec_embed (SpecAugment off) and, with a fixed layer, the layers above it never get a gradient."""
    import json
    import shutil

    from lobes.harmonifuse.layer_select import freeze_unused_encoder_parameters
    from lobes.wavlm_encoder import WavLMEncoder
    src = tmp_path / "wavlm"
    shutil.copytree(tiny_dirs[0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mask_time_prob": 0.05}))  # WavLM-Large has one
    enc = WavLMEncoder(str(src))
    enc.model.masked_spec_embed.requires_grad_(True)  # WavLMEncoder freezes it itself; another encoder may not
    frozen = freeze_unused_encoder_parameters(enc, fixed_layer=2)
    above = {n for n, _ in enc.model.named_parameters() if n.startswith(("encoder.layers.2.", "encoder.layers.3."))}
    assert set(frozen) == {"masked_spec_embed", "encoder.layer_norm.weight", "encoder.layer_norm.bias"} | above
    assert len(above) > 10 and not enc.model.encoder.layers[3].attention.q_proj.weight.requires_grad
    assert enc.model.encoder.layers[1].attention.q_proj.weight.requires_grad
    # what stays trainable really gets gradients through layer 2's output
    hs, _ = enc(torch.randn(1, 4000), torch.tensor([1.0]))
    hs[2].sum().backward()
    missing = [n for n, p in enc.model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert freeze_unused_encoder_parameters(WavLMEncoder(str(tiny_dirs[0])), None) == []  # tiny: no spec embed


def test_speech_lm_frozen_lm_and_classify_mode(tiny_dirs):
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(), {"source": str(tiny_dirs[1]), "mode": "frozen"}, prompts={"mode": "soft"},
                 ser={"mode": "classify", "emotions": EMOTIONS})
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


def test_settings_groups_name_a_wrong_key(tiny_dirs):
    with pytest.raises(DataError, match=r"speech_lm speech: .*'gte'.*fields of SpeechSettings: \['gate'"):
        SpeechLM(ToyEncoder(), str(tiny_dirs[1]), speech={"gte": "channel"})
    with pytest.raises(DataError, match="prompt_mode must be one of"):
        SpeechLM(ToyEncoder(), str(tiny_dirs[1]), prompts={"mode": "words"})
    with pytest.raises(DataError, match="ser_mode must be 'generate' or 'classify'"):
        SpeechLM(ToyEncoder(), str(tiny_dirs[1]), ser={"mode": "regress"})
