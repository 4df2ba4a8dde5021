"""HarmoniFuse speech language model: WavLM -> encoder layer fusion -> adapter -> causal LM -> dynamic fusion.

    wav ─ encoder (all hidden states) ─ GatedEncoderFusion[τ] ─ SpeechAdapter (stack 4, MLP) ─┐
    LM input  = [BOS] [prompt_τ] [speech embeddings] [target tokens]                          ┘
    LM hidden states of layers 1..L ─ final norm ─ PromptAdaptiveFusion[τ](prefix) ─ lm_head ─ next token

* Encoder fusion: :class:`lobes.harmonifuse.gated_encoder_fusion.GatedEncoderFusion` (default ``encoder_gate="none"``: the
  paper's per-task softmax layer sum; ``"channel"`` adds this project's channel gate), or with
  ``fixed_layer=l`` the ablation :class:`FixedLayerSelect` (transformer layer l's output for every task).
* Encoder: any module whose ``forward(wavs, wav_lens)`` returns ``(hidden_states [L+1, B, T, D],
  frames)`` with index 0 the CNN output; ``frames`` is a bool frame mask [B, T] (what
  :class:`lobes.wavlm_encoder.WavLMEncoder` returns), absolute frame counts [B] (int) or SpeechBrain relative
  lengths [B] (float). It needs ``num_layers``/``hidden_size`` attributes or the ``encoder_layers``/
  ``encoder_dim`` arguments.
* Task prompts: ``prompt_mode="text"`` (default) tokenises ``task_prompts[τ]`` (instruction words such as
  "Transcribe the audio.") and feeds their token embeddings; ``"soft"`` learns ``num_prompt_tokens`` vectors
  per task instead.
* LM: ``AutoModelForCausalLM`` from ``lm_source`` (hub id or ``save_pretrained`` dir; ``lm_from_config``
  builds a random one from its config), loaded in ``lm_dtype``. ``lm_mode``: ``frozen`` (no LM weight
  trains), ``lora`` (``peft`` adapters from ``lm_peft_config``, e.g. a ``peft.LoraConfig``; every other LM
  weight frozen) or ``full``. ``lm_gradient_checkpointing`` recomputes the LM layers in backward (HF
  checkpoints only in train mode, i.e. for ``lora`` / ``full``). A directory holding ``char_tokenizer.json``
  (see ``tools/make_tiny_lm.py``) uses :class:`CharTokenizer`; anything else goes through ``AutoTokenizer``.
* Only the logits the loss needs are built: the LM's decoder (no head) runs once with
  ``output_hidden_states``; the hidden states at the target positions are gathered, fused and only then
  go through ``lm_head`` ([B, N, V], N = target tokens, instead of [B, S, V]). In training with
  ``loss_chunk_size=k`` not even those are kept: the loss is summed over chunks of k target tokens, each
  chunk's logits rebuilt in backward (:func:`chunked_cross_entropy`); ``output.logits`` is then None.
* LM-layer fusion: HF puts the LM's final norm on the last hidden state only, so the same norm is applied
  to layers 1..L-1 before fusing (every fused state is on the scale ``lm_head`` expects; with
  ``lm_fusion="last"`` the model is exactly the plain LM). The embedding output (index 0) is not fused.
  α is computed from the prefix (BOS + prompt + speech) only, see :mod:`lobes.harmonifuse.dynamic_fusion`.
* Decoding: transformers' ``generate`` (greedy or beam search, batched) on :class:`FusedHeadLM`, a
  ``PreTrainedModel`` view of this model whose forward applies the same fusion: α comes from the prefill
  step (the prefix) and is carried to every later step, so generation scores exactly what training scores.
* Targets: ASR = transcript text; SER in ``ser_mode="generate"`` = the emotion word as text, in
  ``"classify"`` = a linear head over the mean of the fused prefix states (labels: names from ``emotions``
  or indices). Every generated target ends with EOS. Loss = token-level cross-entropy averaged over all
  target tokens of the batch (classification: mean over utterances).
* Training sequences are right-padded, with no padding mask (causal attention already keeps the trailing
  padding out of every real position), generation prefixes left-padded with a mask; ``position_ids`` are
  always the count of real tokens before a position, so both see the same positions.
* No host read in the training step: prefixes are padded tensors built from the device-side speech lengths
  (:meth:`SpeechLM.prefix_embeddings`), the targets are placed by a scatter at device-computed positions,
  the token ids are tokenised on the host and sent in one copy, and the loss has a shape known on the host
  (tests/test_device_meta.py checks it at WavLM-Large shape).
* DDP: parameters that can never get a gradient are frozen at construction (WavLM's ``masked_spec_embed``
  when SpecAugment is off; with ``fixed_layer=l`` the encoder layers above l), so every trainable parameter
  is used by every batch of every task except the ``classify`` head on ASR batches.
"""
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lobes.errors import DataError
from lobes.harmonifuse.dynamic_fusion import PromptAdaptiveFusion, masked_mean
from lobes.harmonifuse.gated_encoder_fusion import (
    GatedEncoderFusion,
    stack_hidden_states,
    task_indices,
)
from lobes.io_utils import atomic_path, atomic_write

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# 4 specials + 60 characters = 64 = vocab_size of tools/tiny_configs/causal_lm.json.
DEFAULT_CHARS = (" '" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz" + ".,?!-:")


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


LM_MODES = ("frozen", "lora", "full")
PROMPT_MODES = ("text", "soft")
# Instruction words of prompt_mode="text" when no task_prompts are given (the recipe YAML sets its own).
DEFAULT_TASK_PROMPTS = {"asr": "Transcribe the audio.", "ser": "Which emotion does the speaker express?"}
LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name, key="lm_dtype"):
    if isinstance(name, torch.dtype):
        return name
    if name not in LM_DTYPES:
        raise DataError(f"{key} must be one of {sorted(LM_DTYPES)}, got {name!r}")
    return LM_DTYPES[name]


def load_causal_lm(source, from_config=False, dtype=torch.float32):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}  # torch_dtype is deprecated from 4.56
    try:
        if from_config:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), **kw)
        return AutoModelForCausalLM.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
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


def to_frame_mask(frames, num_frames):
    """Encoder's second output (bool mask / absolute counts / relative lengths) -> bool mask [B, T]."""
    if frames.dim() == 2:
        return frames[:, :num_frames].bool()
    if frames.is_floating_point():
        counts = torch.round(frames * num_frames).long()
    else:
        counts = frames.long()
    counts = counts.clamp(1, num_frames)
    return torch.arange(num_frames, device=frames.device)[None, :] < counts[:, None]


def positions(attn_mask, length):
    """position_ids of the last ``length`` columns: the count of real tokens before each position."""
    return (attn_mask.long().cumsum(1) - 1).clamp(min=0)[:, -length:]


def pad_prefixes(prefixes):
    """A list of prefix embeddings [K_b, D] -> right-padded [B, K, D] and mask [B, K] (tools and tests; the
    model builds its prefixes padded, see :meth:`SpeechLM.prefix_embeddings`)."""
    K = max(p.shape[0] for p in prefixes)
    embeds = prefixes[0].new_zeros(len(prefixes), K, prefixes[0].shape[1])
    mask = torch.zeros(len(prefixes), K, dtype=torch.bool, device=prefixes[0].device)
    for b, p in enumerate(prefixes):
        embeds[b, : p.shape[0]] = p
        mask[b, : p.shape[0]] = True
    return embeds, mask


def _ce_sum(hidden, targets, head):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden, targets, head, chunk):
    """Σ-token cross-entropy of ``head(hidden)`` [M, V] against ``targets`` [M], ``chunk`` rows at a time.

    Each chunk's logits are built inside a (non-reentrant) activation checkpoint: forward keeps only the
    scalar, backward rebuilds that chunk's logits. Peak logit memory is chunk x V instead of M x V (with a
    150k vocabulary and 2,000 target tokens per batch: 1.2 GB fp32 -> 150 MB at chunk 256), for one more
    ``head`` matmul per step. Returns the sum (callers divide by the token count).
    """
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_ce_sum, hidden[i:i + chunk], targets[i:i + chunk], head, use_reentrant=False)
    return total


def freeze_unused_encoder_parameters(encoder, fixed_layer=None):
    """Freeze encoder parameters that can get no gradient, so DDP needs no ``find_unused_parameters``.

    HF WavLM / wav2vec2 keep ``masked_spec_embed`` (used only by SpecAugment time masking, off in
    :func:`lobes.wavlm_encoder.load_wavlm`). With a fixed layer l < L, layers l+1..L (and, for stable-layer-norm
    models, the final encoder LayerNorm, applied to hidden state L only) never reach the loss.
    Returns the names frozen here.
    """
    model = getattr(encoder, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return []
    frozen = []

    def freeze(prefix, module):
        for n, p in module.named_parameters(prefix=prefix):
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(n)

    spec = getattr(model, "masked_spec_embed", None)
    if isinstance(spec, torch.nn.Parameter) and spec.requires_grad and not (
            getattr(config, "apply_spec_augment", False) and getattr(config, "mask_time_prob", 0) > 0):
        spec.requires_grad_(False)
        frozen.append("masked_spec_embed")
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if fixed_layer is not None and layers is not None and fixed_layer < len(layers):
        for i in range(fixed_layer, len(layers)):
            freeze(f"encoder.layers.{i}", layers[i])
        if getattr(config, "do_stable_layer_norm", False):
            freeze("encoder.layer_norm", model.encoder.layer_norm)
    return frozen


class SpeechAdapter(torch.nn.Module):
    """Downsample by stacking k consecutive frames, then Linear-ReLU-Linear to the LM width.

    [B, T, D] -> [B, ceil(T/k), out_dim]. Invalid frames are zeroed before stacking so padding never leaks
    into the last real stacked frame; an utterance of n frames keeps ceil(n/k) stacked frames. WavLM's
    50 Hz becomes 12.5 Hz for k=4, keeping LM sequences short.
    """

    def __init__(self, in_dim, out_dim, stack=4, hidden=None):
        super().__init__()
        self.stack = int(stack)
        hidden = hidden or out_dim
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(in_dim * self.stack, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out_dim))

    def forward(self, x, mask):
        b, t, d = x.shape
        k = self.stack
        x = x * mask[:, :, None].to(x.dtype)
        pad = (-t) % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.reshape(b, (t + pad) // k, k * d)
        n = (mask.sum(1) + k - 1) // k
        out_mask = torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]
        return self.proj(x), out_mask


@dataclass
class SpeechLMOutput:
    loss: torch.Tensor            # scalar (None without targets)
    logits: torch.Tensor          # generate: [B, N, V] predictions of target tokens 1..N (EOS last), None when
                                  # training with loss_chunk_size (never built whole); classify: [B, C]
    target_ids: torch.Tensor      # generate: [B, N] with -100 on padding; classify: [B] label indices
    lm_weights: torch.Tensor      # [B, L] dynamic LM-layer weights α
    task: str


class SpeechLM(torch.nn.Module):
    """HarmoniFuse multi-task speech LM (see module doc). Main entry points: ``forward``, ``generate``.

    Arguments
    ---------
    encoder : torch.nn.Module
        Speech encoder whose ``forward(wavs, wav_lens)`` returns ``(hidden_states [L+1, B, T, D], frames)``.
    lm_source : str
        HF hub id or ``save_pretrained`` directory of the causal LM and its tokenizer.
    tasks : sequence of str
        Task names τ, in order; each gets its own encoder fusion weights, prompt and LM-layer fusion.
    prompt_mode : str
        ``"text"`` (instruction words from ``task_prompts``) or ``"soft"`` (learned prompt vectors).
    task_prompts : dict or None
        ``{task: instruction text}`` for ``prompt_mode="text"``; None uses the built-in defaults.
    num_prompt_tokens : int
        Learned prompt vectors per task, with ``prompt_mode="soft"``.
    stack : int
        Speech adapter downsampling: consecutive encoder frames stacked into one.
    adapter_hidden : int or None
        Hidden width of the speech adapter's MLP; None uses the LM width.
    encoder_gate : str
        Encoder layer fusion gate: ``"none"`` (the paper's per-task softmax layer sum) or ``"channel"``.
    include_cnn : bool
        Also fuse the encoder's CNN output (hidden state 0).
    encoder_layer_norm : bool
        Layer-normalise each encoder layer before the per-task fusion weights apply.
    lm_fusion : str
        LM-layer fusion: ``"dynamic"`` (prompt-adaptive α: learnable per-task, per-layer scalar plus an FFN score
        of the prefix), ``"static"`` (the scalars only) or ``"last"`` (no fusion: the plain LM).
    fusion_ffn_hidden : int
        Hidden width H of the FFN that scores each LM layer's pooled prefix (``lm_fusion="dynamic"``).
    lm_mode : str
        ``"frozen"``, ``"lora"`` (peft adapters from ``lm_peft_config``) or ``"full"`` LM training.
    lm_peft_config : peft.PeftConfig or None
        Adapter configuration (e.g. ``peft.LoraConfig``), needed by ``lm_mode="lora"``.
    lm_dtype : str or torch.dtype
        dtype the LM is loaded in: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    lm_gradient_checkpointing : bool
        Recompute the LM layers in backward (HF applies it in train mode only).
    loss_chunk_size : int or None
        In training, sum the loss over chunks of this many target tokens, rebuilding each chunk's logits in
        backward; None builds all target logits at once.
    lm_from_config : bool
        Build a randomly initialised LM from ``lm_source``'s config instead of loading its weights.
    ser_task : str
        Name of the emotion task among ``tasks``.
    ser_mode : str
        ``"generate"`` (emotion word as text) or ``"classify"`` (linear head over the fused prefix states).
    emotions : sequence of str
        Emotion class names (labels of the ``classify`` head).
    encoder_layers : int or None
        Number of encoder transformer layers L; None reads ``encoder.num_layers``.
    encoder_dim : int or None
        Encoder width D; None reads ``encoder.hidden_size``.
    fixed_layer : int or None
        Ablation: use transformer layer l's output for every task instead of the fusion; None fuses.
    """

    def __init__(self, encoder, lm_source, tasks=("asr", "ser"), prompt_mode="text", task_prompts=None,
                 num_prompt_tokens=4, stack=4, adapter_hidden=None, encoder_gate="none", include_cnn=False,
                 encoder_layer_norm=False, lm_fusion="dynamic", fusion_ffn_hidden=64, lm_mode="frozen",
                 lm_peft_config=None, lm_dtype="float32", lm_gradient_checkpointing=False, loss_chunk_size=None,
                 lm_from_config=False,
                 ser_task="ser", ser_mode="generate", emotions=(), encoder_layers=None, encoder_dim=None,
                 fixed_layer=None):
        super().__init__()
        if ser_mode not in ("generate", "classify"):
            raise DataError(f"ser_mode must be 'generate' or 'classify', got '{ser_mode}'")
        if lm_mode not in LM_MODES:
            raise DataError(f"lm_mode must be one of {LM_MODES}, got '{lm_mode}'")
        if prompt_mode not in PROMPT_MODES:
            raise DataError(f"prompt_mode must be one of {PROMPT_MODES}, got '{prompt_mode}'")
        self.tasks = tuple(tasks)
        self.ser_task, self.ser_mode = ser_task, ser_mode
        self.emotions = list(emotions)
        self.encoder = encoder
        enc_layers = encoder_layers if encoder_layers is not None else getattr(encoder, "num_layers", None)
        enc_dim = encoder_dim if encoder_dim is not None else getattr(encoder, "hidden_size", None)
        if enc_layers is None or enc_dim is None:
            raise DataError("encoder has no num_layers/hidden_size; pass encoder_layers= and encoder_dim=")
        freeze_unused_encoder_parameters(encoder, fixed_layer)
        lm = load_causal_lm(lm_source, from_config=lm_from_config, dtype=resolve_dtype(lm_dtype))
        self.tokenizer = load_tokenizer(lm_source)
        if len(self.tokenizer) > lm.get_input_embeddings().num_embeddings:
            raise DataError(f"lm_source '{lm_source}': tokenizer has {len(self.tokenizer)} tokens but the LM "
                            f"only {lm.get_input_embeddings().num_embeddings} embeddings")
        self.lm_mode = lm_mode
        if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or int(loss_chunk_size) < 1):
            raise DataError(f"loss_chunk_size must be null or a positive number of tokens, got {loss_chunk_size!r}")
        self.loss_chunk_size = None if loss_chunk_size is None else int(loss_chunk_size)
        if lm_gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lm_mode == "frozen":
            lm.requires_grad_(False)
        elif lm_mode == "lora":
            if lm_peft_config is None:
                raise DataError("lm_mode 'lora' needs lm_peft_config (e.g. a peft.LoraConfig in the YAML)")
            from peft import get_peft_model
            lm = get_peft_model(lm, lm_peft_config)  # freezes every LM weight but the adapters
        self.lm = lm
        lm_dim = self.hf_lm.get_input_embeddings().embedding_dim
        lm_layers = self.hf_lm.config.num_hidden_layers
        if fixed_layer is None:
            self.encoder_fusion = GatedEncoderFusion(enc_layers, enc_dim, self.tasks, gate=encoder_gate,
                                                     include_cnn=include_cnn, layer_norm=encoder_layer_norm)
        else:  # ablation: one fixed encoder layer for every task, no weights, no gate
            self.encoder_fusion = FixedLayerSelect(fixed_layer, enc_layers, enc_dim, self.tasks)
        self.adapter = SpeechAdapter(enc_dim, lm_dim, stack=stack, hidden=adapter_hidden)
        self.prompt_mode = prompt_mode
        self.prompt_ids = {}
        if prompt_mode == "soft":
            # Prompts start at the scale of the LM's own token embeddings.
            emb_std = self.hf_lm.get_input_embeddings().weight.detach().float().std().item()
            self.prompts = torch.nn.Parameter(torch.randn(len(self.tasks), num_prompt_tokens, lm_dim) * emb_std)
        else:
            self.register_parameter("prompts", None)
            task_prompts = DEFAULT_TASK_PROMPTS if task_prompts is None else dict(task_prompts)
            missing = [t for t in self.tasks if not isinstance(task_prompts.get(t), str)]
            if missing:
                raise DataError(f"task_prompts needs an instruction text for task(s) {missing} "
                                f"(prompt_mode 'text'), got {task_prompts}")
            for t in self.tasks:
                ids = list(self.tokenizer.encode(task_prompts[t], add_special_tokens=False))
                if not ids:
                    raise DataError(f"task_prompts.{t}: '{task_prompts[t]}' gives no tokens")
                self.prompt_ids[t] = ids
        self.lm_fusion = PromptAdaptiveFusion(lm_layers, lm_dim, self.tasks, ffn_hidden=fusion_ffn_hidden,
                                              mode=lm_fusion)
        self.classifier = torch.nn.Linear(lm_dim, len(self.emotions)) if ser_mode == "classify" else None
        # Running mean of dynamic weights per task, for fusion_weights() plots (not checkpointed).
        self.register_buffer("_alpha_sum", torch.zeros(len(self.tasks), lm_layers), persistent=False)
        self.register_buffer("_alpha_count", torch.zeros(len(self.tasks)), persistent=False)

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def hf_lm(self):
        """The transformers causal LM (inside the peft wrapper in ``lm_mode="lora"``)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def decoder(self):
        """The LM without its head (LLaMA/Qwen ``model``, GPT-2 ``transformer``): no logits are built by it."""
        return self.hf_lm.base_model

    def train(self, mode=True):
        super().train(mode)
        if self.lm_mode == "frozen":
            self.lm.eval()  # a frozen LM keeps dropout off
        return self

    def _task_index(self, task):
        if isinstance(task, str):
            if task not in self.tasks:
                raise DataError(f"unknown task '{task}'; this model knows {list(self.tasks)}")
            return self.tasks.index(task)
        return int(task)

    def _is_classify(self, task):
        return self.ser_mode == "classify" and self.tasks[self._task_index(task)] == self.ser_task

    def _embed_ids(self, ids):
        return self.hf_lm.get_input_embeddings()(ids)

    def encode_speech(self, wavs, wav_lens, task):
        """-> speech embeddings [B, T', D_lm], mask [B, T']."""
        hidden, frames = self.encoder(wavs, wav_lens)
        hidden = torch.stack(list(hidden)) if isinstance(hidden, (list, tuple)) else hidden
        mask = to_frame_mask(frames, hidden.shape[2]).to(hidden.device)
        fused = self.encoder_fusion(hidden, self._task_index(task))
        return self.adapter(fused, mask)

    def prompt_embeddings(self, task, device):
        """[P, D] embeddings of task τ's prompt: its instruction's token embeddings, or the learned vectors."""
        t = self._task_index(task)
        if self.prompts is not None:
            return self.prompts[t].to(self.hf_lm.get_input_embeddings().weight.dtype)
        return self._embed_ids(torch.tensor(self.prompt_ids[self.tasks[t]], dtype=torch.long, device=device))

    def prefix_embeddings(self, speech, smask, task):
        """Right-padded prefixes [B, K, D] and their mask [B, K], K = P + T': [BOS] + prompt_τ (P positions) +
        speech; utterance b's prefix is its first P + n_b positions (n_b = its speech length), padding is zero.

        Fixed shapes from the batch (the speech lengths n_b stay on the device: no host read per utterance).
        """
        emb_dtype = self.hf_lm.get_input_embeddings().weight.dtype
        head = self.prompt_embeddings(task, speech.device)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None:
            head = torch.cat([self._embed_ids(torch.full((1,), bos, dtype=torch.long, device=speech.device)), head])
        B = speech.shape[0]
        speech = speech.to(emb_dtype).masked_fill(~smask[:, :, None], 0.0)
        embeds = torch.cat([head[None].expand(B, -1, -1), speech], dim=1)
        mask = torch.cat([smask.new_ones(B, head.shape[0]), smask], dim=1)
        return embeds, mask

    def run_decoder(self, embeds, attn_mask=None, **kwargs):
        """The LM's layers on ``embeds`` -> (raw hidden states of layers 1..L (tuple), decoder output).

        ``attn_mask=None``: right-padded sequences. Causal attention alone then keeps the padding (always after
        an utterance's last real position) out of every real position, and positions are 0, 1, ... as for an
        unpadded sequence, so no padding mask is built (transformers would read it on the host to decide
        whether it can skip it). Left-padded input (generation) passes its mask.
        """
        if attn_mask is None:
            B, S = embeds.shape[:2]
            pos = torch.arange(S, device=embeds.device)[None].expand(B, -1)
            out = self.decoder(inputs_embeds=embeds, position_ids=pos, output_hidden_states=True, **kwargs)
        else:
            out = self.decoder(inputs_embeds=embeds, attention_mask=attn_mask.long(),
                               position_ids=positions(attn_mask, embeds.shape[1]), output_hidden_states=True,
                               **kwargs)
        return out.hidden_states[1:], out

    def layer_states(self, hidden, index=None):
        """Normalised states of layers 1..L, [L, B, N, D], at positions ``index`` [B, N] (None: all).

        HF already normalised the last one. Gathering before the norm keeps the [L, B, S, D] stack unbuilt.
        ``lm_fusion="last"`` needs only the last layer: [1, B, N, D].
        """
        norm = final_norm(self.hf_lm)
        out = []
        last = len(hidden) - 1
        for i, h in enumerate(hidden):
            if self.lm_fusion.mode == "last" and i < last:
                continue
            if index is not None:
                h = torch.gather(h, 1, index[:, :, None].expand(-1, -1, h.shape[-1]))
            out.append(h if i == last else norm(h))
        return torch.stack(out)

    def pooled_layers(self, hidden, pool_mask):
        """Mask-mean over the prefix of every normalised layer, [L, B, D], one layer at a time."""
        norm = final_norm(self.hf_lm)
        last = len(hidden) - 1
        return torch.stack([masked_mean((h if i == last else norm(h))[None], pool_mask)[0]
                            for i, h in enumerate(hidden)])

    def layer_alpha(self, hidden, task, pool_mask, pooled=None):
        """α [B, L] from the raw decoder states and the prefix mask (one-hot for ``lm_fusion="last"``)."""
        B = hidden[0].shape[0]
        if self.lm_fusion.mode == "last":
            return self.lm_fusion.last_layer_weights(B, hidden[0].device)
        if pooled is None:
            pooled = self.pooled_layers(hidden, pool_mask)
        return torch.softmax(self.lm_fusion.pooled_scores(pooled, task), dim=-1)

    def fuse(self, states, alpha):
        """Σ_l α_l states_l; ``states`` from :meth:`layer_states` ([1, ...] for ``lm_fusion="last"``)."""
        if self.lm_fusion.mode == "last":
            return states[0]
        return PromptAdaptiveFusion.fuse(states, alpha)

    def _record(self, task, alpha):
        with torch.no_grad():
            t = self._task_index(task)
            self._alpha_sum[t] += alpha.detach().float().sum(0)
            self._alpha_count[t] += alpha.shape[0]

    def _target_ids(self, targets):
        ids = []
        for i, text in enumerate(targets):
            if not isinstance(text, str):
                raise DataError(f"target {i} is a {type(text).__name__}, expected text")
            ids.append(list(self.tokenizer.encode(text, add_special_tokens=False)) + [self.tokenizer.eos_token_id])
        return ids

    def _label_indices(self, targets, device):
        if isinstance(targets, torch.Tensor):
            return targets.long().to(device, non_blocking=True)
        idx = []
        for t in targets:
            if isinstance(t, str):
                if t not in self.emotions:
                    raise DataError(f"emotion label '{t}' is not one of {self.emotions}")
                idx.append(self.emotions.index(t))
            else:
                idx.append(int(t))
        return torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)

    # ----------------------------------------------------------------------------------------- forward
    def _teacher_forcing_tensors(self, tgt, device):
        """From the host token lists ``tgt`` (EOS last): LM input ids [B, N-1] (target without its EOS, 0 on
        padding), target ids [B, N] (-100 on padding), and the flat indices / ids of the real target tokens
        ([M], row-major), built on the host and sent in one copy."""
        B, N = len(tgt), max(len(y) for y in tgt)
        inp = torch.zeros(B, N - 1, dtype=torch.long)
        ids = torch.full((B, N), -100, dtype=torch.long)
        flat = []
        for b, y in enumerate(tgt):
            inp[b, : len(y) - 1] = torch.tensor(y[:-1], dtype=torch.long)
            ids[b, : len(y)] = torch.tensor(y, dtype=torch.long)
            flat += range(b * N, b * N + len(y))
        flat = torch.tensor(flat, dtype=torch.long)
        packed = torch.cat([inp.reshape(-1), ids.reshape(-1), flat]).to(device, non_blocking=True)
        inp, ids, flat = packed.split([inp.numel(), ids.numel(), flat.numel()])
        return inp.view(B, N - 1), ids.view(B, N), flat

    def forward(self, wavs, wav_lens, task, targets=None):
        speech, smask = self.encode_speech(wavs, wav_lens, task)
        prefix, pmask = self.prefix_embeddings(speech, smask, task)
        (B, _, D), dev = prefix.shape, speech.device
        if self._is_classify(task):
            return self._classify(prefix, pmask, task, targets, dev)
        if targets is None:
            raise DataError(f"task '{task}' is generative: forward needs targets (use generate() to decode)")
        if len(targets) != B:
            raise DataError(f"{len(targets)} targets for a batch of {B}")
        tgt = self._target_ids(targets)
        N = max(len(y) for y in tgt)
        inp, target_ids, flat = self._teacher_forcing_tensors(tgt, dev)
        # Teacher forcing, right-padded: utterance b reads its prefix (K_b = P + n_b positions), then its target
        # tokens without the final EOS at K_b, K_b+1, ...; S = K + N - 1 fits the longest of both. The
        # targets go in by a scatter at device-computed positions (they overwrite speech padding, if any).
        k_b = pmask.sum(1)                                                # [B] prefix lengths, on the device
        steps = torch.arange(N, device=dev)
        embeds = torch.cat([prefix, prefix.new_zeros(B, N - 1, D)], dim=1)
        at = (k_b[:, None] + steps[None, : N - 1])[:, :, None].expand(-1, -1, D)
        embeds = embeds.scatter(1, at, self._embed_ids(inp).to(embeds.dtype))
        pool = torch.cat([pmask, pmask.new_zeros(B, N - 1)], dim=1)      # α pools the prefix only
        gather = k_b[:, None] - 1 + steps[None, :]                        # position K_b-1+j predicts token j
        hidden, _ = self.run_decoder(embeds, None, use_cache=False)
        alpha = self.layer_alpha(hidden, task, pool)
        self._record(task, alpha)
        fused = self.fuse(self.layer_states(hidden, gather), alpha)     # [B, N, D]: target positions only
        head = self.hf_lm.get_output_embeddings()
        if self.training and self.loss_chunk_size is not None and torch.is_grad_enabled():
            # the real target tokens by host-known indices (a fixed shape, no boolean selection)
            loss = chunked_cross_entropy(fused.reshape(B * N, -1).index_select(0, flat),
                                         target_ids.reshape(-1).index_select(0, flat), head,
                                         self.loss_chunk_size) / flat.numel()
            return SpeechLMOutput(loss, None, target_ids, alpha, self.tasks[self._task_index(task)])
        logits = head(fused).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids.reshape(-1), ignore_index=-100)
        return SpeechLMOutput(loss, logits, target_ids, alpha, self.tasks[self._task_index(task)])

    @staticmethod
    def left_padded(embeds, mask):
        """Right-padded [B, K, D] + mask -> the same rows left-padded (real positions last), for ``generate``."""
        K = embeds.shape[1]
        src = torch.arange(K, device=embeds.device)[None] - (K - mask.sum(1))[:, None]
        left = src >= 0
        out = torch.gather(embeds, 1, src.clamp(min=0)[:, :, None].expand(-1, -1, embeds.shape[2]))
        return out.masked_fill(~left[:, :, None], 0.0), left

    def _classify(self, prefix, pmask, task, targets, dev):
        hidden, _ = self.run_decoder(prefix, None, use_cache=False)   # right-padded: see run_decoder
        pooled = self.pooled_layers(hidden, pmask)                      # [L, B, D]
        alpha = self.layer_alpha(hidden, task, pmask, pooled=pooled)
        self._record(task, alpha)
        # mean over the prefix of Σ_l α_l h_l = Σ_l α_l (mean of h_l): the fused [B, K, D] is never built
        fused = PromptAdaptiveFusion.fuse(pooled[:, :, None], alpha)[:, 0]
        logits = self.classifier(fused.to(self.classifier.weight.dtype)).float()
        labels = loss = None
        if targets is not None:
            labels = self._label_indices(targets, dev)
            loss = F.cross_entropy(logits, labels)
        return SpeechLMOutput(loss, logits, labels, alpha, self.tasks[self._task_index(task)])

    # -------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, wavs, wav_lens, task, max_len=200, num_beams=1, length_penalty=1.0):
        """Greedy (``num_beams=1``) or beam-search decoding with transformers ``generate`` -> list of strings.

        ``ser_mode="classify"``: the argmax emotion names. α is computed once from the prefix and reused for
        every generated token, as in training (see :class:`FusedHeadLM`). ``max_len`` = new tokens, EOS
        included; ``length_penalty`` is HF's (beam score = Σ log p / length^length_penalty).
        """
        speech, smask = self.encode_speech(wavs, wav_lens, task)
        prefix, pmask = self.prefix_embeddings(speech, smask, task)
        if self._is_classify(task):
            out = self._classify(prefix, pmask, task, None, speech.device)
            return [self.emotions[i] for i in out.logits.argmax(-1).tolist()]
        return self.generate_from_prefixes(prefix, pmask, task, max_len, num_beams, length_penalty)

    @torch.no_grad()
    def generate_from_prefixes(self, prefix, mask, task, max_len=200, num_beams=1, length_penalty=1.0):
        """Decode from ready right-padded prefix embeddings [B, K, D] and their mask [B, K] -> list of strings
        (:func:`pad_prefixes` builds them from a list of [K_b, D])."""
        from transformers import GenerationConfig

        embeds, attn = self.left_padded(prefix, mask)
        eos = self.tokenizer.eos_token_id
        pad = getattr(self.tokenizer, "pad_token_id", None)
        config = GenerationConfig(
            max_new_tokens=int(max_len), do_sample=False, num_beams=int(num_beams), num_return_sequences=1,
            length_penalty=float(length_penalty), early_stopping=num_beams > 1,
            eos_token_id=eos, pad_token_id=eos if pad is None else pad,
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None), use_cache=True)
        model = FusedHeadLM(self, task)
        seqs = model.generate(inputs_embeds=embeds, attention_mask=attn.long(), generation_config=config)
        out = []
        for row in seqs.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return out

    # ------------------------------------------------------------------------------------------- plots
    def fusion_weights(self, task):
        """Weights for plots: encoder α^τ, encoder gate, static LM weights softmax(b_τ) and the running mean
        of the dynamic LM weights seen since :meth:`reset_fusion_stats` (None before any batch)."""
        t = self._task_index(task)
        count = self._alpha_count[t].item()
        return {
            "encoder": self.encoder_fusion.layer_weights(t),
            "encoder_gate": self.encoder_fusion.gate_values(t),
            "lm_static": self.lm_fusion.static_weights(t),
            "lm_dynamic_mean": (self._alpha_sum[t] / count).clone() if count else None,
        }

    def reset_fusion_stats(self):
        self._alpha_sum.zero_()
        self._alpha_count.zero_()


@dataclass
class FusedLMOutput(CausalLMOutputWithPast):
    lm_alpha: torch.Tensor | None = None   # [B, L] dynamic LM-layer weights α of the prefix


class FusedHeadLM(PreTrainedModel, GenerationMixin):
    """What transformers ``generate`` decodes: the speech LM's decoder -> per-layer norm -> fusion -> ``lm_head``.

    Why a model of its own rather than ``self.lm.generate``: the HarmoniFuse dynamic fusion changes what the LM
    head sees (Σ_l α_l norm(h_l), not the last layer), so the plain LM's logits would be those of another model.
    This ``PreTrainedModel`` holds the :class:`SpeechLM` (built per ``generate`` call, never a submodule of it,
    so no weight is stored twice) and its forward applies the same fusion as training:

    * prefill step (no ``lm_alpha`` yet): the whole left-padded prefix is in the call; α is computed from it
      with the attention mask as the pool mask, exactly as :meth:`SpeechLM.forward` pools the prefix;
    * α is returned in the output and put back into the model kwargs by
      :meth:`_update_model_kwargs_for_generation`, so every later step reuses it (target tokens never move α);
    * only the last position's logits are built.

    Beam search: HF expands the prefix to ``num_beams`` copies per utterance before the prefill, so every beam
    of an utterance gets the same α; reordering beams inside an utterance therefore never needs α reordered.
    """

    # attention runs inside the wrapped LM, which was loaded with its own implementation
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, speech_lm, task):
        super().__init__(copy.deepcopy(speech_lm.hf_lm.config))  # a copy: init may adjust its attention fields
        self.speech_lm = speech_lm
        self.task = task

    def get_input_embeddings(self):
        return self.speech_lm.hf_lm.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None,
                use_cache=None, cache_position=None, lm_alpha=None, **kwargs):
        slm = self.speech_lm
        if inputs_embeds is None:
            inputs_embeds = slm._embed_ids(input_ids)
        attn = attention_mask.bool()
        hidden, out = slm.run_decoder(inputs_embeds, attn, past_key_values=past_key_values, use_cache=use_cache,
                                      cache_position=cache_position)
        if lm_alpha is None:
            lm_alpha = slm.layer_alpha(hidden, self.task, attn)
        B, S = inputs_embeds.shape[:2]
        last = torch.full((B, 1), S - 1, dtype=torch.long, device=inputs_embeds.device)
        fused = slm.fuse(slm.layer_states(hidden, last), lm_alpha)
        logits = slm.hf_lm.get_output_embeddings()(fused).float()
        return FusedLMOutput(logits=logits, past_key_values=out.past_key_values, lm_alpha=lm_alpha)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["lm_alpha"] = outputs.lm_alpha
        return model_kwargs


# ------------------------------------------------------------------------------------- ablation and recipe helpers
class FixedLayerSelect(torch.nn.Module):
    """Drop-in for :class:`GatedEncoderFusion` that returns one fixed encoder layer for every task.

    ``layer`` counts transformer layers 1..L (hidden-state index ``layer``; 0, the CNN output, is not offered).
    ``layer_weights`` is one-hot on that layer and ``gate_values`` all ones, so plots and logs keep working.
    """

    def __init__(self, layer, num_layers, hidden_size, tasks=("asr", "ser")):
        super().__init__()
        self.tasks = tuple(tasks)
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
            raise DataError(f"fixed_layer={layer!r} is not a transformer layer of this {self.num_layers}-layer "
                            f"encoder (valid: 1..{self.num_layers})")
        self.layer = layer
        self.include_cnn = False

    def forward(self, hidden_states, task):
        hs = stack_hidden_states(hidden_states)
        if hs.shape[0] != self.num_layers + 1:
            raise DataError(f"encoder gave {hs.shape[0]} hidden states, expected {self.num_layers + 1} "
                            f"(CNN output + {self.num_layers} layers)")
        task_indices(task, self.tasks, hs.shape[1], hs.device)  # same task checks as the gated fusion
        return hs[self.layer]

    def layer_weights(self, task):
        task_indices(task, self.tasks, 1, "cpu")
        w = torch.zeros(self.num_layers)
        w[self.layer - 1] = 1.0
        return w

    def gate_values(self, task):
        task_indices(task, self.tasks, 1, "cpu")
        return torch.ones(self.hidden_size)


def rescale_layer_index(layer, num_layers, reference_layers=None):
    """Map a layer counted on a ``reference_layers``-deep encoder to this ``num_layers``-deep one.

    ``round(layer · num_layers / reference_layers)``, at least 1: the paper's layers 12 and 24 of WavLM-Large
    (24 layers) are the middle and the top; on the 4-layer test WavLM they become 2 and 4. Identity when
    ``reference_layers`` is None or equals ``num_layers``; None stays None (no fixed layer).

    Arguments
    ---------
    layer : int or None
        Layer index counted on the reference encoder; None means no fixed layer.
    num_layers : int
        Transformer layers of the encoder in use.
    reference_layers : int or None
        Transformer layers of the encoder ``layer`` was counted on (24 for the paper's WavLM-Large).
    """
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise DataError(f"fixed_layer must be an integer layer number, got {layer!r}")
    if reference_layers is None or int(reference_layers) == int(num_layers):
        return layer
    if not 1 <= layer <= int(reference_layers):
        raise DataError(f"fixed_layer={layer} is outside 1..{reference_layers} (layer_depth_reference)")
    return max(1, int(round(layer * int(num_layers) / int(reference_layers))))


@register_checkpoint_hooks
class TrainableParameters:
    """Checkpoint recoverable holding only the parameters of ``module`` that train (safetensors file).

    A frozen LM (and a frozen WavLM) is re-read from its source, not copied into every checkpoint: with a
    1B-parameter LM that is gigabytes per epoch. Loading checks that the file holds exactly the parameters
    that train now (a checkpoint from a differently frozen configuration is refused, naming the file).

    Arguments
    ---------
    module : torch.nn.Module
        Model whose parameters with ``requires_grad`` are saved and loaded.
    """

    def __init__(self, module):
        self.module = module

    def _trainable(self):
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @mark_as_saver
    def save(self, path):
        from safetensors.torch import save_file
        state = {n: p.detach().cpu().contiguous() for n, p in self._trainable().items()}
        with atomic_path(path) as tmp:
            save_file(state, tmp)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # SafetensorError, OSError
            raise DataError(f"{path}: cannot read the trainable-parameter checkpoint ({e})") from e
        params = self._trainable()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise DataError(f"{path}: checkpoint does not match the trainable parameters (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); was it saved with other freeze settings?")
        with torch.no_grad():
            for n, p in params.items():
                if state[n].shape != p.shape:
                    raise DataError(f"{path}: '{n}' has shape {tuple(state[n].shape)}, model has {tuple(p.shape)}")
                p.copy_(state[n].to(p.device, p.dtype))

