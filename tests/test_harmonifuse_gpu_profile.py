"""The HarmoniFuse GPU profile's LM settings (row gpu_llm_lora): LM gradient checkpointing that also works on a
frozen LM, and lm_attn_implementation reaching transformers."""
import pytest
import torch

from toy_encoder import ToyEncoder  # tests/ is on sys.path (pytest rootdir conftest)
from lobes.errors import DataError
from lobes.harmonifuse.speech_lm import SpeechLM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tools.make_tiny_lm import make_tiny_lm
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "lm")


def _step(lm_dir, mode, checkpointing, attn="sdpa"):
    """One training forward/backward; -> (model, decoder-layer forward calls, adapter gradients)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    m = SpeechLM(ToyEncoder(num_layers=2, seed=0), {"source": str(lm_dir), "mode": mode, "gradient_checkpointing": checkpointing,
                              "peft_config": lora, "attn_implementation": attn}).train()
    calls = []
    for layer in m.hf_lm.model.layers:  # count forward() itself: module hooks do not run in a recomputation
        layer.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(layer.forward)
    torch.manual_seed(1)
    m(torch.randn(2, 1200), torch.tensor([1.0, 0.7]), "asr", ["HELLO", "HI"]).loss.backward()
    return m, len(calls), [p.grad.clone() for p in m.adapter.parameters()]


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_lm_gradient_checkpointing_recomputes_the_layers_also_when_the_lm_is_frozen(tiny_lm, mode):
    """4 LM layers: run 4 times without checkpointing, 8 with (forward + recomputation in backward), for a frozen
    LM too (its speech input requires grad); the gradients are the same, and the frozen LM's dropout stays off."""
    _, plain_calls, plain = _step(tiny_lm, mode, False)
    m, gc_calls, grads = _step(tiny_lm, mode, True)
    assert (plain_calls, gc_calls) == (4, 8)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads))
    if mode == "frozen":
        assert not any(mod.training for mod in m.lm.modules() if isinstance(mod, torch.nn.Dropout))
        assert [mod.training for mod in m.hf_lm.model.layers] == [True] * 4
        m.eval()
        assert not any(mod.training for mod in m.lm.modules())


def test_attn_implementation_reaches_transformers(tiny_lm):
    sdpa = SpeechLM(ToyEncoder(num_layers=2, seed=0), {"source": str(tiny_lm)}).eval()
    eager = SpeechLM(ToyEncoder(num_layers=2, seed=0), {"source": str(tiny_lm), "attn_implementation": "eager"}).eval()
    assert sdpa.hf_lm.config._attn_implementation == "sdpa" and eager.hf_lm.config._attn_implementation == "eager"
    torch.manual_seed(1)
    wavs, lens = torch.randn(2, 1200), torch.tensor([1.0, 0.7])
    assert torch.allclose(sdpa(wavs, lens, "asr", ["HELLO", "HI"]).logits,
                          eager(wavs, lens, "asr", ["HELLO", "HI"]).logits, atol=1e-5)
    with pytest.raises(DataError, match="lm_attn_implementation 'flash_attention_2'"):
        SpeechLM(ToyEncoder(num_layers=2, seed=0), {"source": str(tiny_lm), "attn_implementation": "flash_attention_2"})


def test_the_gpu_row_builds_a_bf16_checkpointed_lora_lm_that_trains(tiny_lm, tmp_path, monkeypatch):
    """hparams/rows/gpu_llm_lora.yaml with the tiny WavLM and LM: the settings reach the built model, and one
    training step gives the LoRA adapters a finite gradient while the bf16 base weights get none."""
    from pathlib import Path

    from lobes.hparams_io import load_hparams
    from tools.make_tiny_wavlm import make_tiny_wavlm

    row = Path(__file__).resolve().parents[1] / "recipes/MSP-Podcast/harmonifuse/hparams/rows/gpu_llm_lora.yaml"
    monkeypatch.chdir(tmp_path)
    h, _, _ = load_hparams(row, {"lm_source": str(tiny_lm), "wavlm_source": str(make_tiny_wavlm(tmp_path / "w")),
                                 "msp_folder": str(tmp_path), "libri_folder": str(tmp_path)})
    assert (h["precision"], h["lm_dtype"], h["lm_mode"]) == ("bf16", "bfloat16", "lora")
    m = h["speech_lm"].train()
    lm = m.hf_lm
    assert lm.is_gradient_checkpointing and lm.config._attn_implementation == "sdpa"
    assert m.encoder.model.is_gradient_checkpointing  # WavLM
    assert {p.dtype for n, p in m.lm.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    torch.manual_seed(0)
    m(torch.randn(2, 3200) * 0.1, torch.tensor([1.0, 0.8]), "asr", ["HELLO", "HI"]).loss.backward()
    lora = [p.grad for n, p in m.lm.named_parameters() if "lora_B" in n]
    assert lora and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora)
    assert all(p.grad is None for n, p in m.lm.named_parameters() if "lora_" not in n)
