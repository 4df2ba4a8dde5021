"""The causal LM of the HarmoniFuse speech LM: its tokenizer, its weights and how it trains (frozen, LoRA, full).

* ``source``: HF hub id or ``save_pretrained`` directory (``from_config`` builds a random LM from its config).
* A directory holding ``char_tokenizer.json`` (see ``tools/make_tiny_lm.py``) uses :class:`CharTokenizer`;
  anything else goes through ``AutoTokenizer``.
* ``mode``: ``frozen`` (no LM weight trains), ``lora`` (``peft`` adapters from ``peft_config``, e.g. a
  ``peft.LoraConfig``; every other LM weight frozen) or ``full``. LoRA's ``target_modules`` come from the
  config: the recipe's default ``all-linear`` (every Linear / Conv1D but the head, any architecture) or None
  (peft's per-architecture table; an architecture missing from it is a DataError naming the key).
  ``gradient_checkpointing`` recomputes the LM layers in backward (non-reentrant; a frozen LM too, see
  :func:`frozen_lm_mode`). ``attn_implementation`` goes to ``from_pretrained`` / ``from_config`` (``sdpa``
  default, ``flash_attention_2`` with flash-attn on a GPU).
* :func:`final_norm` finds the LM's final normalisation, which the LM-layer fusion applies to every layer.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lobes.errors import DataError
from lobes.io_utils import atomic_write

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# 4 specials + 60 characters = 64 = vocab_size of tools/tiny_configs/causal_lm.json.
DEFAULT_CHARS = (" '" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz" + ".,?!-:")
LM_MODES = ("frozen", "lora", "full")
LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CharTokenizer:
    """Character-level tokenizer for tiny test LMs: no download, same surface as the HF methods used here."""

    def __init__(self, chars=DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise DataError("character vocabulary has duplicates")
        self.tokens = SPECIAL_TOKENS + list(chars)
        self.index = {c: i for i, c in enumerate(self.tokens)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3

    def __len__(self):
        return len(self.tokens)

    def encode(self, text, add_special_tokens=False):
        return [self.index.get(c, self.unk_token_id) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        n = len(SPECIAL_TOKENS)
        return "".join(self.tokens[i] for i in ids if not (skip_special_tokens and i < n))

    def save_pretrained(self, directory):
        with atomic_write(Path(directory) / CHAR_TOKENIZER_FILE) as f:
            json.dump({"type": "char", "chars": "".join(self.tokens[len(SPECIAL_TOKENS):])}, f)

    @classmethod
    def from_pretrained(cls, directory):
        path = Path(directory) / CHAR_TOKENIZER_FILE
        try:
            spec = json.loads(path.read_text())
            return cls(spec["chars"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a valid char tokenizer file ({e})") from e


def load_tokenizer(source):
    """CharTokenizer if ``source`` is a dir with char_tokenizer.json, else ``AutoTokenizer``."""
    if (Path(str(source)) / CHAR_TOKENIZER_FILE).exists():
        return CharTokenizer.from_pretrained(source)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DataError(f"lm_source '{source}': no char_tokenizer.json and no loadable HF tokenizer ({e})") from e
    if tok.eos_token_id is None:
        raise DataError(f"lm_source '{source}': tokenizer has no EOS token; generation could not stop")
    return tok


def resolve_dtype(name, key="lm_dtype"):
    if isinstance(name, torch.dtype):
        return name
    if name not in LM_DTYPES:
        raise DataError(f"{key} must be one of {sorted(LM_DTYPES)}, got {name!r}")
    return LM_DTYPES[name]


def load_causal_lm(source, from_config=False, dtype=torch.float32, attn_implementation="sdpa"):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}  # torch_dtype is deprecated from 4.56
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    try:
        if from_config:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), **kw)
        return AutoModelForCausalLM.from_pretrained(source, **kw)
    except ImportError as e:  # flash_attention_2 without the flash-attn package
        raise DataError(f"lm_attn_implementation '{attn_implementation}' cannot be used here: {e}") from e
    except (OSError, ValueError) as e:
        if attn_implementation is not None and "attn" in str(e).lower():
            raise DataError(f"lm_attn_implementation '{attn_implementation}' on lm_source '{source}': {e}") from e
        raise DataError(f"lm_source '{source}' is neither a local causal-LM directory nor a reachable hub id: {e}") from e


def final_norm(lm):
    """The LM's final normalisation module (LLaMA/Qwen/Mistral ``norm``, GPT-2 ``ln_f``, OPT ...)."""
    base = lm.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(base, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    decoder = getattr(base, "decoder", None)
    if decoder is not None:
        for name in ("final_layer_norm", "norm"):
            mod = getattr(decoder, name, None)
            if isinstance(mod, torch.nn.Module):
                return mod
    raise DataError(f"cannot find the final norm of {type(lm).__name__}; layer fusion needs it")


@dataclass(frozen=True)
class LMSettings:
    """Which causal LM and how it trains (the recipe's ``lm_*`` keys; see the module doc)."""

    source: str
    mode: str = "frozen"                   # lm_mode: frozen | lora | full
    peft_config: object = None             # lm_peft_config: a peft config, needed by mode "lora"
    dtype: object = "float32"              # lm_dtype: float32 | bfloat16 | float16 (or a torch.dtype)
    gradient_checkpointing: bool = False   # lm_gradient_checkpointing
    from_config: bool = False              # lm_from_config: random weights from the source's config
    attn_implementation: str = "sdpa"      # lm_attn_implementation: sdpa | eager | flash_attention_2 (None: HF's)

    def __post_init__(self):
        if self.mode not in LM_MODES:
            raise DataError(f"lm_mode must be one of {LM_MODES}, got '{self.mode}'")
        if self.mode == "lora" and self.peft_config is None:
            raise DataError("lm_mode 'lora' needs lm_peft_config (e.g. a peft.LoraConfig in the YAML)")
        resolve_dtype(self.dtype)


def load_lm(settings):
    """-> (the LM prepared for ``settings.mode`` (a peft model in ``lora``), its tokenizer)."""
    lm = load_causal_lm(settings.source, from_config=settings.from_config, dtype=resolve_dtype(settings.dtype),
                        attn_implementation=settings.attn_implementation)
    tokenizer = load_tokenizer(settings.source)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        raise DataError(f"lm_source '{settings.source}': tokenizer has {len(tokenizer)} tokens but the LM "
                        f"only {lm.get_input_embeddings().num_embeddings} embeddings")
    if settings.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.mode == "frozen":
        lm.requires_grad_(False)
    elif settings.mode == "lora":
        from peft import get_peft_model
        try:  # freezes every LM weight but the adapters
            lm = get_peft_model(lm, settings.peft_config)
        except ValueError as e:  # no per-architecture default, or target names the LM does not have
            raise DataError(f"lm_peft_config on lm_source '{settings.source}' ({lm.config.model_type}): {e}. Set "
                            "lora_target_modules: all-linear, or this architecture's module names") from e
    return lm, tokenizer


def frozen_lm_mode(lm, training):
    """Train/eval mode of a frozen LM: eval (no dropout), except, when training with gradient checkpointing, the
    layers that checkpoint (they have ``gradient_checkpointing`` set): transformers checkpoints a layer only when
    its own ``training`` is set, and the speech input still requires grad, so a frozen LM would otherwise keep
    every layer's activations for the backward pass to the adapter. Their submodules (dropout, attention) stay
    in eval mode."""
    lm.eval()
    if training and getattr(lm, "is_gradient_checkpointing", False):
        for m in lm.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True
    return lm


def hf_model(lm):
    """The transformers causal LM (inside the peft wrapper in ``lm_mode="lora"``)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm
