"""HarmoniFuse speech language model: WavLM -> gated encoder fusion -> adapter -> causal LM -> dynamic fusion.

    wav ─ encoder (all hidden states) ─ GatedEncoderFusion[τ] ─ SpeechAdapter (stack 4, MLP) ─┐
    LM input  = [BOS] [prompt_τ (P learned vectors)] [speech embeddings] [target tokens]       ┘
    LM hidden states of layers 1..L ─ final norm ─ PromptAdaptiveFusion[τ](prefix) ─ lm_head ─ next token

* Encoder fusion: :class:`lobes.harmonifuse.gated_encoder_fusion.GatedEncoderFusion`, or with ``fixed_layer=l`` the
  ablation :class:`FixedLayerSelect` (transformer layer l's output for every task, as in fixed-layer SLMs).
* Encoder: any module whose ``forward(wavs, wav_lens)`` returns ``(hidden_states [L+1, B, T, D],
  frames)`` with index 0 the CNN output; ``frames`` is a bool frame mask [B, T] (what
  :class:`lobes.wavlm_encoder.WavLMEncoder` returns), absolute frame counts [B] (int) or SpeechBrain relative
  lengths [B] (float). It needs ``num_layers``/``hidden_size`` attributes or the ``encoder_layers``/
  ``encoder_dim`` arguments.
* LM: ``AutoModelForCausalLM`` from ``lm_source`` (hub id or ``save_pretrained`` dir; ``lm_from_config``
  builds a random one from its config). A directory holding ``char_tokenizer.json`` (see
  ``tools/make_tiny_lm.py``) uses :class:`CharTokenizer`; anything else goes through ``AutoTokenizer``.
* LM-layer fusion: HF puts the LM's final norm on the last hidden state only, so the same norm is applied
  to layers 1..L-1 before fusing (every fused state is on the scale ``lm_head`` expects; with
  ``lm_fusion="last"`` the model is exactly the plain LM). The embedding output (index 0) is not fused.
  α is computed from the prefix (BOS + prompt + speech) only, see :mod:`lobes.harmonifuse.dynamic_fusion`.
* Targets: ASR = transcript text; SER in ``ser_mode="generate"`` = the emotion word as text, in
  ``"classify"`` = a linear head over the mean of the fused prefix states (labels: names from ``emotions``
  or indices). Every generated target ends with EOS. Loss = token-level cross-entropy averaged over all
  target tokens of the batch (classification: mean over utterances).
* Training sequences are right-padded and generation prefixes left-padded; ``position_ids`` are always
  the count of real tokens before a position, so both see the same positions.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from lobes.harmonifuse.dynamic_fusion import PromptAdaptiveFusion
from lobes.errors import DataError
from lobes.harmonifuse.gated_encoder_fusion import GatedEncoderFusion, stack_hidden_states, task_indices
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
            raise DataError(f"{path}: not a valid char tokenizer file ({e})")


def load_tokenizer(source):
    """CharTokenizer if ``source`` is a dir with char_tokenizer.json, else ``AutoTokenizer``."""
    if (Path(str(source)) / CHAR_TOKENIZER_FILE).exists():
        return CharTokenizer.from_pretrained(source)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DataError(f"lm_source '{source}': no char_tokenizer.json and no loadable HF tokenizer ({e})")
    if tok.eos_token_id is None:
        raise DataError(f"lm_source '{source}': tokenizer has no EOS token; generation could not stop")
    return tok


def load_causal_lm(source, from_config=False):
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        if from_config:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        return AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DataError(f"lm_source '{source}' is neither a local causal-LM directory nor a reachable hub id: {e}")


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
    logits: torch.Tensor          # generate: [B, N, V] predictions of target tokens 1..N (EOS last); classify: [B, C]
    target_ids: torch.Tensor      # generate: [B, N] with -100 on padding; classify: [B] label indices
    lm_weights: torch.Tensor      # [B, L] dynamic LM-layer weights α
    task: str


class SpeechLM(torch.nn.Module):
    """HarmoniFuse multi-task speech LM (see module doc). Main entry points: ``forward``, ``generate``."""

    def __init__(self, encoder, lm_source, tasks=("asr", "ser"), num_prompt_tokens=4, stack=4,
                 adapter_hidden=None, encoder_gate="channel", include_cnn=False, encoder_layer_norm=False,
                 lm_fusion="dynamic", fusion_ffn_hidden=64, freeze_lm=True, lm_from_config=False,
                 ser_task="ser", ser_mode="generate", emotions=(), encoder_layers=None, encoder_dim=None,
                 fixed_layer=None):
        super().__init__()
        if ser_mode not in ("generate", "classify"):
            raise DataError(f"ser_mode must be 'generate' or 'classify', got '{ser_mode}'")
        self.tasks = tuple(tasks)
        self.ser_task, self.ser_mode = ser_task, ser_mode
        self.emotions = list(emotions)
        self.encoder = encoder
        enc_layers = encoder_layers if encoder_layers is not None else getattr(encoder, "num_layers", None)
        enc_dim = encoder_dim if encoder_dim is not None else getattr(encoder, "hidden_size", None)
        if enc_layers is None or enc_dim is None:
            raise DataError("encoder has no num_layers/hidden_size; pass encoder_layers= and encoder_dim=")
        self.lm = load_causal_lm(lm_source, from_config=lm_from_config)
        self.tokenizer = load_tokenizer(lm_source)
        if len(self.tokenizer) > self.lm.get_input_embeddings().num_embeddings:
            raise DataError(f"lm_source '{lm_source}': tokenizer has {len(self.tokenizer)} tokens but the LM "
                            f"only {self.lm.get_input_embeddings().num_embeddings} embeddings")
        self.freeze_lm = freeze_lm
        if freeze_lm:
            self.lm.requires_grad_(False)
        lm_dim = self.lm.get_input_embeddings().embedding_dim
        lm_layers = self.lm.config.num_hidden_layers
        if fixed_layer is None:
            self.encoder_fusion = GatedEncoderFusion(enc_layers, enc_dim, self.tasks, gate=encoder_gate,
                                                     include_cnn=include_cnn, layer_norm=encoder_layer_norm)
        else:  # ablation: one fixed encoder layer for every task, no weights, no gate
            self.encoder_fusion = FixedLayerSelect(fixed_layer, enc_layers, enc_dim, self.tasks)
        self.adapter = SpeechAdapter(enc_dim, lm_dim, stack=stack, hidden=adapter_hidden)
        # Prompts start at the scale of the LM's own token embeddings.
        emb_std = self.lm.get_input_embeddings().weight.detach().float().std().item()
        self.prompts = torch.nn.Parameter(torch.randn(len(self.tasks), num_prompt_tokens, lm_dim) * emb_std)
        self.lm_fusion = PromptAdaptiveFusion(lm_layers, lm_dim, self.tasks, ffn_hidden=fusion_ffn_hidden,
                                              mode=lm_fusion)
        self.classifier = torch.nn.Linear(lm_dim, len(self.emotions)) if ser_mode == "classify" else None
        # Running mean of dynamic weights per task, for fusion_weights() plots (not checkpointed).
        self.register_buffer("_alpha_sum", torch.zeros(len(self.tasks), lm_layers), persistent=False)
        self.register_buffer("_alpha_count", torch.zeros(len(self.tasks)), persistent=False)

    # ----------------------------------------------------------------------------------------- helpers
    def train(self, mode=True):
        super().train(mode)
        if self.freeze_lm:
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
        return self.lm.get_input_embeddings()(ids)

    def encode_speech(self, wavs, wav_lens, task):
        """-> speech embeddings [B, T', D_lm], mask [B, T']."""
        hidden, frames = self.encoder(wavs, wav_lens)
        hidden = torch.stack(list(hidden)) if isinstance(hidden, (list, tuple)) else hidden
        mask = to_frame_mask(frames, hidden.shape[2]).to(hidden.device)
        fused = self.encoder_fusion(hidden, self._task_index(task))
        return self.adapter(fused, mask)

    def _prefixes(self, speech, smask, task):
        """Per-utterance list of prefix embeddings [K_b, D]: [BOS] + prompt_τ + valid speech frames."""
        emb_dtype = self.lm.get_input_embeddings().weight.dtype
        prompt = self.prompts[self._task_index(task)].to(emb_dtype)
        head = [prompt]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None:
            head = [self._embed_ids(torch.tensor([bos], device=speech.device)), prompt]
        return [torch.cat(head + [speech[b, : int(smask[b].sum())].to(emb_dtype)]) for b in range(speech.shape[0])]

    def _lm_states(self, embeds, attn_mask, **kwargs):
        """Run the LM; returns (normalised hidden states of layers 1..L as [L, B, S, D], model output)."""
        pos = (attn_mask.long().cumsum(1) - 1).clamp(min=0)
        if "past_key_values" in kwargs:
            pos = pos[:, -embeds.shape[1]:]
        out = self.lm(inputs_embeds=embeds, attention_mask=attn_mask.long(), position_ids=pos,
                      output_hidden_states=True, **kwargs)
        hs = out.hidden_states[1:]
        norm = final_norm(self.lm)
        states = torch.stack([norm(h) for h in hs[:-1]] + [hs[-1]])
        return states, out

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
            return targets.long().to(device)
        idx = []
        for t in targets:
            if isinstance(t, str):
                if t not in self.emotions:
                    raise DataError(f"emotion label '{t}' is not one of {self.emotions}")
                idx.append(self.emotions.index(t))
            else:
                idx.append(int(t))
        return torch.tensor(idx, dtype=torch.long, device=device)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, wavs, wav_lens, task, targets=None):
        speech, smask = self.encode_speech(wavs, wav_lens, task)
        prefixes = self._prefixes(speech, smask, task)
        B, dev = len(prefixes), speech.device
        if self._is_classify(task):
            return self._classify(prefixes, task, targets, dev)
        if targets is None:
            raise DataError(f"task '{task}' is generative: forward needs targets (use generate() to decode)")
        if len(targets) != B:
            raise DataError(f"{len(targets)} targets for a batch of {B}")
        tgt = self._target_ids(targets)
        # Teacher forcing: the LM reads prefix + target tokens without the final EOS.
        seqs = [torch.cat([p, self._embed_ids(torch.tensor(y[:-1], dtype=torch.long, device=dev))])
                for p, y in zip(prefixes, tgt)]
        S = max(s.shape[0] for s in seqs)
        D = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(B, S, D)
        attn = torch.zeros(B, S, dtype=torch.bool, device=dev)
        pool = torch.zeros(B, S, dtype=torch.bool, device=dev)
        N = max(len(y) for y in tgt)
        gather = torch.zeros(B, N, dtype=torch.long, device=dev)
        target_ids = torch.full((B, N), -100, dtype=torch.long, device=dev)
        for b, (s, p, y) in enumerate(zip(seqs, prefixes, tgt)):
            embeds[b, : s.shape[0]] = s
            attn[b, : s.shape[0]] = True
            pool[b, : p.shape[0]] = True
            # position K-1+j predicts target token j
            gather[b, : len(y)] = torch.arange(p.shape[0] - 1, p.shape[0] - 1 + len(y), device=dev)
            target_ids[b, : len(y)] = torch.tensor(y, device=dev)
        states, _ = self._lm_states(embeds, attn)
        alpha = self.lm_fusion.layer_weights(states, task, pool)
        self._record(task, alpha)
        idx = gather[None, :, :, None].expand(states.shape[0], B, N, states.shape[-1])
        fused = PromptAdaptiveFusion.fuse(torch.gather(states, 2, idx), alpha)
        logits = self.lm.get_output_embeddings()(fused).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids.reshape(-1), ignore_index=-100)
        return SpeechLMOutput(loss, logits, target_ids, alpha, self.tasks[self._task_index(task)])

    def _pad_left(self, prefixes):
        B, K, D = len(prefixes), max(p.shape[0] for p in prefixes), prefixes[0].shape[1]
        embeds = prefixes[0].new_zeros(B, K, D)
        attn = torch.zeros(B, K, dtype=torch.bool, device=prefixes[0].device)
        for b, p in enumerate(prefixes):
            embeds[b, K - p.shape[0]:] = p
            attn[b, K - p.shape[0]:] = True
        return embeds, attn

    def _classify(self, prefixes, task, targets, dev):
        embeds, attn = self._pad_left(prefixes)
        states, _ = self._lm_states(embeds, attn)
        fused, alpha = self.lm_fusion(states, task, attn)
        self._record(task, alpha)
        m = attn[:, :, None].to(fused.dtype)
        pooled = (fused * m).sum(1) / m.sum(1)
        logits = self.classifier(pooled.to(self.classifier.weight.dtype)).float()
        labels = loss = None
        if targets is not None:
            labels = self._label_indices(targets, dev)
            loss = F.cross_entropy(logits, labels)
        return SpeechLMOutput(loss, logits, labels, alpha, self.tasks[self._task_index(task)])

    # -------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, wavs, wav_lens, task, max_len=200):
        """Greedy decoding -> list of strings (``ser_mode="classify"``: the argmax emotion names).

        α is computed once from the prefix and reused for every generated token, as in training.
        """
        speech, smask = self.encode_speech(wavs, wav_lens, task)
        prefixes = self._prefixes(speech, smask, task)
        if self._is_classify(task):
            out = self._classify(prefixes, task, None, speech.device)
            return [self.emotions[i] for i in out.logits.argmax(-1).tolist()]
        embeds, attn = self._pad_left(prefixes)
        states, out = self._lm_states(embeds, attn, use_cache=True)
        alpha = self.lm_fusion.layer_weights(states, task, attn)
        head = self.lm.get_output_embeddings()
        eos = self.tokenizer.eos_token_id
        B = embeds.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
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
            attn = torch.cat([attn, torch.ones(B, 1, dtype=torch.bool, device=attn.device)], dim=1)
            states, out = self._lm_states(self._embed_ids(tok[:, None]), attn, past_key_values=past,
                                          use_cache=True)
            past = out.past_key_values
            last = PromptAdaptiveFusion.fuse(states, alpha)
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in result]

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

