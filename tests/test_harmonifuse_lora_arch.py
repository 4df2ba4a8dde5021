"""LoRA on any causal LM: the recipe YAML alone (overrides of lm_source / lm_from_config) builds the speech LM on tiny
Llama, Qwen2, GPT-2, Phi and Gemma models, each from its transformers config class and with a tokenizer of its own
class (a byte-level BPE trained here: no download), and one training step moves the LoRA adapters, never the base.

Default ``lora_target_modules: all-linear``: every Linear / Conv1D of the LM but its head, whatever the layer names
(GPT-2's fused ``c_attn`` Conv1D, Phi's ``dense`` / ``fc1``); ``null`` takes peft's per-architecture table.
"""
from pathlib import Path

import pytest
import torch
import transformers as T
from transformers.pytorch_utils import Conv1D
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

from lobes.errors import DataError
from lobes.hparams_io import load_hparams

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "recipes/MSP-Podcast/harmonifuse/hparams/harmonifuse.yaml"
WAVLM = ROOT / "tools/fixtures/tiny_wavlm_pretrained"
VOCAB = 320  # > the 256 byte symbols + merges + specials of the tokenizers below
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "max_position_embeddings": 256}
# architecture -> (config, its tokenizer class, BOS token or None (Qwen2 has none))
ARCHS = {
    "llama": (lambda: T.LlamaConfig(**SMALL, num_key_value_heads=1), T.LlamaTokenizerFast, "<s>"),
    "qwen2": (lambda: T.Qwen2Config(**SMALL, num_key_value_heads=1), T.Qwen2TokenizerFast, None),
    "gpt2": (lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=256),
             T.GPT2TokenizerFast, "<s>"),
    "phi": (lambda: T.PhiConfig(**SMALL), T.CodeGenTokenizerFast, "<s>"),
    "gemma": (lambda: T.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16), T.GemmaTokenizerFast, "<s>"),
}
SENTENCES = ["Transcribe the audio.", "Which emotion does the speaker express?", "Anger", "Sadness",
             "HELLO WORLD", "the quick brown fox jumps over the lazy dog"] * 4


def _tokenizer(cls, bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=VOCAB - 16, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return cls(tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """A save_pretrained directory per architecture: config.json (no weights) + its tokenizer."""
    root = tmp_path_factory.mktemp("lora_arch")
    out = {}
    for name, (config, tok_cls, bos) in ARCHS.items():
        d = root / name
        config().save_pretrained(d)
        _tokenizer(tok_cls, bos).save_pretrained(d)
        out[name] = d
    return out


def _speech_lm(lm_dir, tmp_path, **extra):
    overrides = {"msp_folder": "unused", "libri_folder": "unused", "output_folder": str(tmp_path / "exp"),
                 "wavlm_source": str(WAVLM), "lm_source": str(lm_dir), "lm_from_config": True, "lora_dropout": 0.0,
                 **extra}
    h, _, _ = load_hparams(str(YAML), overrides)
    return h


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_all_linear_trains_one_step_on_each_architecture(arch, lm_dirs, tmp_path):
    torch.manual_seed(0)
    h = _speech_lm(lm_dirs[arch], tmp_path)
    m = h["speech_lm"]
    assert type(m.tokenizer).__name__ == ARCHS[arch][1].__name__ and m.hf_lm.config.model_type == arch
    assert (m.tokenizer.bos_token_id is None) == (ARCHS[arch][2] is None)
    base = m.hf_lm
    # every Linear / Conv1D of the decoder got an adapter, the head did not
    plain = {n for n, mod in base.named_modules() if type(mod) in (torch.nn.Linear, Conv1D) and "lora_" not in n}
    assert {n for n in plain if not n.endswith(".base_layer")} == {"lm_head"}, sorted(plain)
    wrapped = {n.removesuffix(".base_layer") for n in plain if n.endswith(".base_layer")}
    assert len(wrapped) == {"gpt2": 4, "phi": 6}.get(arch, 7) * 2   # per layer: attention + MLP projections
    lora = {n: p.detach().clone() for n, p in m.lm.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in m.lm.named_parameters() if "lora_" not in n}
    assert all(p.requires_grad for n, p in m.lm.named_parameters() if n in lora)
    assert not any(p.requires_grad for n, p in m.lm.named_parameters() if n in frozen)
    m.train()
    opt = h["opt_class"]([p for p in m.parameters() if p.requires_grad])
    out = m(torch.randn(2, 8000), torch.tensor([1.0, 0.6]), "asr", ["HELLO WORLD", "the fox"])
    out.loss.backward()
    opt.step()
    after = dict(m.lm.named_parameters())
    b = [n for n in lora if "lora_B" in n]
    assert len(b) == len(wrapped) and all(after[n].grad.abs().sum() > 0 for n in b)  # every adapter has a gradient
    assert all(lora[n].abs().sum() == 0 and after[n].abs().sum() > 0 for n in b)     # B left its zero init
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)                     # the base LM did not move


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_lora_target_modules_null_takes_peft_defaults(arch, lm_dirs, tmp_path):
    m = _speech_lm(lm_dirs[arch], tmp_path, lora_target_modules=None)["speech_lm"]
    wrapped = {n.rsplit(".base_layer", 1)[0].rsplit(".", 1)[-1] for n, _ in m.hf_lm.named_modules()
               if n.endswith(".base_layer")}
    assert wrapped == set(PEFT_DEFAULTS[arch])   # llama q_proj/v_proj, gpt2 c_attn, phi q/v_proj + fc1/fc2


def test_lora_target_names_missing_from_the_lm_name_the_key(lm_dirs, tmp_path):
    with pytest.raises(DataError, match="lm_peft_config on lm_source .*gpt2.*lora_target_modules"):
        _speech_lm(lm_dirs["gpt2"], tmp_path, lora_target_modules=["q_proj", "v_proj"])
