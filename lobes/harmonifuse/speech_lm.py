"""HarmoniFuse speech language model: WavLM -> encoder layer fusion -> adapter -> causal LM -> dynamic fusion.

    wav ─ encoder (all hidden states) ─ GatedEncoderFusion[τ] ─ SpeechAdapter (stack 4, MLP) ─┐
    LM input  = [BOS] [prompt_τ] [speech embeddings] [target tokens]                          ┘
    LM hidden states of layers 1..L ─ final norm ─ PromptAdaptiveFusion[τ](prefix) ─ lm_head ─ next token

Settings come in groups (dataclasses of :mod:`lobes.harmonifuse.settings`, or the same keys as YAML mappings): ``lm``
(:class:`lobes.harmonifuse.lm_loading.LMSettings`: source, frozen / LoRA / full), ``speech`` (encoder layer
fusion and adapter), ``prompts``, ``fusion`` (LM-layer fusion) and ``ser`` (how emotions are output).

* Encoder fusion: :class:`lobes.harmonifuse.gated_encoder_fusion.GatedEncoderFusion` (default ``gate="none"``:
  the paper's per-task softmax layer sum; ``"channel"`` adds this project's channel gate), or with
  ``fixed_layer=l`` the ablation :class:`lobes.harmonifuse.layer_select.FixedLayerSelect`.
* Encoder: any module whose ``forward(wavs, wav_lens)`` returns ``(hidden_states [L+1, B, T, D], frames)`` with
  index 0 the CNN output; ``frames`` is a bool frame mask [B, T] (what :class:`lobes.wavlm_encoder.WavLMEncoder`
  returns), absolute frame counts [B] (int) or SpeechBrain relative lengths [B] (float). It needs
  ``num_layers``/``hidden_size`` attributes or the ``speech`` settings ``encoder_layers``/``encoder_dim``.
* Task prompts: ``mode="text"`` (default) tokenises ``texts[τ]`` (instruction words such as "Transcribe the
  audio.") and feeds their token embeddings; ``"soft"`` learns ``num_tokens`` vectors per task instead.
* Only the logits the loss needs are built: the LM's decoder (no head) runs once with ``output_hidden_states``;
  the hidden states at the target positions are gathered, fused and only then go through ``lm_head`` ([B, N, V],
  N = target tokens, instead of [B, S, V]). In training with ``loss_chunk_size=k`` not even those are kept: the
  loss is summed over chunks of k target tokens, each chunk's logits rebuilt in backward
  (:func:`chunked_cross_entropy`); ``output.logits`` is then None.
* LM-layer fusion: HF puts the LM's final norm on the last hidden state only, so the same norm is applied to
  layers 1..L-1 before fusing (every fused state is on the scale ``lm_head`` expects). The fusion (either
  ``form``) starts as the last layer alone, so at init (and always with ``mode="last"``) the model is exactly
  the plain LM. The embedding output (index 0) is not fused. The layer weights (β, ``lm_weights``) are computed
  from the prefix (BOS + prompt + speech) only, see :mod:`lobes.harmonifuse.dynamic_fusion`.
* Decoding: :mod:`lobes.harmonifuse.generation` (transformers ``generate`` with the same fusion).
* Targets: ASR = transcript text; SER in ``ser.mode="generate"`` = the emotion word as text, in ``"classify"`` =
  a linear head over the mean of the fused prefix states (labels: names from ``emotions`` or indices). Every
  generated target ends with EOS. Loss = token-level cross-entropy averaged over all target tokens of the batch
  (classification: mean over utterances).
* Training sequences are right-padded, with no padding mask (causal attention already keeps the trailing
  padding out of every real position), generation prefixes left-padded with a mask; ``position_ids`` are
  always the count of real tokens before a position, so both see the same positions.
* No host read in the training step: prefixes are padded tensors built from the device-side speech lengths
  (:meth:`SpeechLM.prefix_embeddings`), the targets are placed by a scatter at device-computed positions, the
  token ids are tokenised on the host and sent in one copy, and the loss has a shape known on the host
  (tests/test_device_meta.py checks it at WavLM-Large shape).
* DDP: parameters that can never get a gradient are frozen at construction (WavLM's ``masked_spec_embed``
  when SpecAugment is off; with ``fixed_layer=l`` the encoder layers above l), so every trainable parameter
  is used by every batch of every task except the ``classify`` head on ASR batches.
"""
from dataclasses import dataclass
from os import PathLike

import torch
import torch.nn.functional as F

from lobes.errors import DataError
from lobes.harmonifuse.adapter import SpeechAdapter, to_frame_mask
from lobes.harmonifuse.dynamic_fusion import PromptAdaptiveFusion, masked_mean
from lobes.harmonifuse.generation import generate_text
from lobes.harmonifuse.layer_select import freeze_unused_encoder_parameters, make_encoder_fusion
from lobes.harmonifuse import targets as T
from lobes.harmonifuse.lm_loading import LMSettings, final_norm, frozen_lm_mode, hf_model, load_lm
from lobes.harmonifuse.settings import (DEFAULT_TASK_PROMPTS, FusionSettings, PromptSettings, SERSettings,  # noqa: F401
                                       SpeechSettings, as_settings, check_chunk_size)
from lobes.harmonifuse.targets import chunked_cross_entropy, label_indices, target_token_ids, teacher_forcing_tensors


def positions(attn_mask, length):
    """position_ids of the last ``length`` columns: the count of real tokens before each position."""
    return (attn_mask.long().cumsum(1) - 1).clamp(min=0)[:, -length:]


@dataclass
class SpeechLMOutput:
    loss: torch.Tensor            # scalar (None without targets)
    logits: torch.Tensor          # generate: [B, N, V] predictions of target tokens 1..N (EOS last), None when
                                  # training with loss_chunk_size (never built whole); classify: [B, C]
    target_ids: torch.Tensor      # generate: [B, N] with -100 on padding; classify: [B] label indices
    lm_weights: torch.Tensor      # [B, L] LM-layer weights β (Σ = 1; one-hot on the last layer at init)
    task: str


class SpeechLM(torch.nn.Module):
    """HarmoniFuse multi-task speech LM (see module doc). Main entry points: ``forward``, ``generate``.

    Arguments
    ---------
    encoder : torch.nn.Module
        Speech encoder whose ``forward(wavs, wav_lens)`` returns ``(hidden_states [L+1, B, T, D], frames)``.
    lm : LMSettings or mapping or str
        The causal LM (a str: its source, the rest default): ``source`` (hub id or ``save_pretrained`` dir,
        also of the tokenizer), ``mode`` (frozen / lora / full), ``peft_config``, ``dtype``,
        ``gradient_checkpointing``, ``from_config``.
    tasks : sequence of str
        Task names τ, in order; each gets its own encoder fusion weights, prompt and LM-layer fusion.
    speech : SpeechSettings or mapping or None
        Encoder layer fusion (``gate``, ``include_cnn``, ``layer_norm``, ``fixed_layer``) and adapter
        (``adapter_stack``, ``adapter_hidden``); None takes the defaults.
    prompts : PromptSettings or mapping or None
        Task prompts: ``mode`` (text / soft), ``texts``, ``num_tokens``.
    fusion : FusionSettings or mapping or None
        LM-layer fusion: ``mode`` (dynamic / static / last), ``ffn_hidden`` and ``form`` (residual / simplex).
    ser : SERSettings or mapping or None
        The emotion task: ``mode`` (generate / classify), ``emotions`` (class names), ``task`` (its name).
    loss_chunk_size : int or None
        In training, sum the loss over chunks of this many target tokens, rebuilding each chunk's logits in
        backward; None builds all target logits at once.
    """

    def __init__(self, encoder, lm, tasks=("asr", "ser"), speech=None, prompts=None, fusion=None, ser=None,
                 loss_chunk_size=None):
        super().__init__()
        lm = LMSettings(str(lm)) if isinstance(lm, (str, PathLike)) else as_settings(LMSettings, lm, "lm")
        speech = as_settings(SpeechSettings, speech, "speech")
        prompts = as_settings(PromptSettings, prompts, "prompts")
        fusion = as_settings(FusionSettings, fusion, "fusion")
        ser = as_settings(SERSettings, ser, "ser")
        self.tasks = tuple(tasks)
        # what rebuilds this model from shared artefacts (lobes.harmonifuse.artefacts)
        self.settings = {"lm": lm, "speech": speech, "prompts": prompts, "fusion": fusion, "ser": ser}
        self.ser_task, self.ser_mode, self.emotions = ser.task, ser.mode, list(ser.emotions)
        self.lm_mode, self.prompt_mode = lm.mode, prompts.mode
        self.loss_chunk_size = check_chunk_size(loss_chunk_size)
        self.encoder = encoder
        enc_layers = speech.encoder_layers if speech.encoder_layers is not None else getattr(encoder, "num_layers",
                                                                                             None)
        enc_dim = speech.encoder_dim if speech.encoder_dim is not None else getattr(encoder, "hidden_size", None)
        if enc_layers is None or enc_dim is None:
            raise DataError("encoder has no num_layers/hidden_size; set the speech settings encoder_layers and "
                            "encoder_dim")
        freeze_unused_encoder_parameters(encoder, speech.fixed_layer)
        self.lm, self.tokenizer = load_lm(lm)
        lm_dim = self.hf_lm.get_input_embeddings().embedding_dim
        lm_layers = self.hf_lm.config.num_hidden_layers
        self.encoder_fusion = make_encoder_fusion(enc_layers, enc_dim, self.tasks, speech.gate, speech.include_cnn,
                                                  speech.layer_norm, speech.fixed_layer)
        self.adapter = SpeechAdapter(enc_dim, lm_dim, stack=speech.adapter_stack, hidden=speech.adapter_hidden)
        self._init_prompts(prompts, lm_dim)
        self.lm_fusion = PromptAdaptiveFusion(lm_layers, lm_dim, self.tasks, ffn_hidden=fusion.ffn_hidden,
                                              mode=fusion.mode, form=fusion.form)
        self.classifier = torch.nn.Linear(lm_dim, len(self.emotions)) if ser.mode == "classify" else None
        # Running mean of dynamic weights per task, for fusion_weights() plots (not checkpointed).
        self.register_buffer("_alpha_sum", torch.zeros(len(self.tasks), lm_layers), persistent=False)
        self.register_buffer("_alpha_count", torch.zeros(len(self.tasks)), persistent=False)

    def _init_prompts(self, settings, lm_dim):
        """Learned prompt vectors (mode soft), or the token ids of each task's instruction words (mode text)."""
        self.prompt_ids = {}
        if settings.mode == "soft":
            # Prompts start at the scale of the LM's own token embeddings.
            emb_std = self.hf_lm.get_input_embeddings().weight.detach().float().std().item()
            self.prompts = torch.nn.Parameter(torch.randn(len(self.tasks), settings.num_tokens, lm_dim) * emb_std)
            return
        self.register_parameter("prompts", None)
        texts = DEFAULT_TASK_PROMPTS if settings.texts is None else dict(settings.texts)
        missing = [t for t in self.tasks if not isinstance(texts.get(t), str)]
        if missing:
            raise DataError(f"task_prompts needs an instruction text for task(s) {missing} "
                            f"(prompt_mode 'text'), got {texts}")
        for t in self.tasks:
            ids = list(self.tokenizer.encode(texts[t], add_special_tokens=False))
            if not ids:
                raise DataError(f"task_prompts.{t}: '{texts[t]}' gives no tokens")
            self.prompt_ids[t] = ids

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def hf_lm(self):
        """The transformers causal LM (inside the peft wrapper in ``lm_mode="lora"``)."""
        return hf_model(self.lm)

    @property
    def decoder(self):
        """The LM without its head (LLaMA/Qwen ``model``, GPT-2 ``transformer``): no logits are built by it."""
        return self.hf_lm.base_model

    def train(self, mode=True):
        super().train(mode)
        if self.lm_mode == "frozen":
            frozen_lm_mode(self.lm, mode)  # dropout off; checkpointing layers (if enabled) stay in training mode
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

    def _head_ids(self, task):
        """Host token ids in front of the speech: BOS (if the tokenizer has one), then in prompt mode text the
        task's instruction words."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        ids = [] if bos is None else [bos]
        return ids if self.prompts is not None else ids + self.prompt_ids[self.tasks[self._task_index(task)]]

    def embed_tokens(self, task, device, extra=None):
        """One embedding lookup for the prefix head and ``extra`` token ids [B, N] (the teacher-forced targets)
        -> (head [H, D] = BOS + prompt_τ (its words' embeddings or the learned vectors), [B, N, D] or None).

        One call per batch, so a trainable embedding gets one dense [V, D] gradient, not one per lookup."""
        head_ids = torch.tensor(self._head_ids(task), dtype=torch.long, device=device)
        ids = head_ids if extra is None else torch.cat([head_ids, extra.reshape(-1)])
        emb = self._embed_ids(ids)
        head, rest = emb[: head_ids.numel()], emb[head_ids.numel():]
        if self.prompts is not None:
            head = torch.cat([head, self.prompts[self._task_index(task)].to(emb.dtype)])
        return head, (None if extra is None else rest.view(*extra.shape, emb.shape[-1]))

    def prompt_embeddings(self, task, device):
        """[P, D] embeddings of task τ's prompt: its instruction's token embeddings, or the learned vectors."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self.embed_tokens(task, device)[0][(0 if bos is None else 1):]

    def prefix_embeddings(self, speech, smask, task, head=None):
        """Right-padded prefixes [B, K, D] and their mask [B, K], K = P + T': [BOS] + prompt_τ (P positions) +
        speech; utterance b's prefix is its first P + n_b positions (n_b = its speech length), padding is zero.
        ``head``: the [P, D] embeddings of BOS + prompt from :meth:`embed_tokens` (None: looked up here).

        Fixed shapes from the batch (the speech lengths n_b stay on the device: no host read per utterance).
        """
        emb_dtype = self.hf_lm.get_input_embeddings().weight.dtype
        if head is None:
            head = self.embed_tokens(task, speech.device)[0]
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
        return self.lm_fusion.pooled_weights(pooled, task)

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

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, wavs, wav_lens, task, targets=None, soft_targets=None):
        speech, smask = self.encode_speech(wavs, wav_lens, task)
        if soft_targets is not None and not self._is_classify(task):  # SER soft labels [B, C] (targets.py)
            speech, smask, targets, pair_p = T.soft_target_pairs(soft_targets, self.emotions, speech, smask)
        B, dev = speech.shape[0], speech.device
        if self._is_classify(task):
            return self._classify(*self.prefix_embeddings(speech, smask, task), task,
                                  targets if soft_targets is None else soft_targets, dev)
        if targets is None:
            raise DataError(f"task '{task}' is generative: forward needs targets (use generate() to decode)")
        if len(targets) != B:
            raise DataError(f"{len(targets)} targets for a batch of {B}")
        tgt = target_token_ids(self.tokenizer, targets)
        N = max(len(y) for y in tgt)
        inp, target_ids, flat = teacher_forcing_tensors(tgt, dev)
        head, target_emb = self.embed_tokens(task, dev, inp)            # BOS, prompt and targets: one lookup
        prefix, pmask = self.prefix_embeddings(speech, smask, task, head)
        D = prefix.shape[2]
        # Teacher forcing, right-padded: utterance b reads its prefix (K_b = P + n_b positions), then its target
        # tokens without the final EOS at K_b, K_b+1, ...; S = K + N - 1 fits the longest of both. The
        # targets go in by a scatter at device-computed positions (they overwrite speech padding, if any).
        k_b = pmask.sum(1)                                                # [B] prefix lengths, on the device
        steps = torch.arange(N, device=dev)
        embeds = torch.cat([prefix, prefix.new_zeros(B, N - 1, D)], dim=1)
        at = (k_b[:, None] + steps[None, : N - 1])[:, :, None].expand(-1, -1, D)
        embeds = embeds.scatter(1, at, target_emb.to(embeds.dtype))
        pool = torch.cat([pmask, pmask.new_zeros(B, N - 1)], dim=1)      # α pools the prefix only
        gather = k_b[:, None] - 1 + steps[None, :]                        # position K_b-1+j predicts token j
        hidden, _ = self.run_decoder(embeds, None, use_cache=False)
        alpha = self.layer_alpha(hidden, task, pool)
        self._record(task, alpha)
        fused = self.fuse(self.layer_states(hidden, gather), alpha)     # [B, N, D]: target positions only
        head = self.hf_lm.get_output_embeddings()
        if soft_targets is not None:  # Σ p·NLL / Σ p·tokens (chunked like the hard loss when training)
            loss = T.soft_target_loss(fused, target_ids, flat, tgt, pair_p, head, self.loss_chunk_size if self.training else None)
            return SpeechLMOutput(loss, None, target_ids, alpha, self.tasks[self._task_index(task)])
        if self.training and self.loss_chunk_size is not None and torch.is_grad_enabled():
            # the real target tokens by host-known indices (a fixed shape, no boolean selection)
            loss = chunked_cross_entropy(fused.reshape(B * N, -1).index_select(0, flat),
                                         target_ids.reshape(-1).index_select(0, flat), head,
                                         self.loss_chunk_size) / flat.numel()
            return SpeechLMOutput(loss, None, target_ids, alpha, self.tasks[self._task_index(task)])
        logits = head(fused).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids.reshape(-1), ignore_index=-100)
        return SpeechLMOutput(loss, logits, target_ids, alpha, self.tasks[self._task_index(task)])

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
            labels = label_indices(targets, self.emotions, dev)  # soft labels [B, C] (float): soft CE
            loss = F.cross_entropy(logits, labels)
        return SpeechLMOutput(loss, logits, labels, alpha, self.tasks[self._task_index(task)])

    # -------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, wavs, wav_lens, task, max_len=200, num_beams=1, length_penalty=1.0):
        """Greedy (``num_beams=1``) or beam-search decoding with transformers ``generate`` -> list of strings.

        ``ser.mode="classify"``: the argmax emotion names. α is computed once from the prefix and reused for
        every generated token, as in training (see :class:`lobes.harmonifuse.generation.FusedHeadLM`).
        ``max_len`` = new tokens, EOS included; ``length_penalty`` is HF's (beam score = Σ log p /
        length^length_penalty).
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
        (:func:`lobes.harmonifuse.generation.pad_prefixes` builds them from a list of [K_b, D])."""
        return generate_text(self, prefix, mask, task, max_len, num_beams, length_penalty)

    # ------------------------------------------------------------------------------------------- plots
    def fusion_weights(self, task):
        """Weights for plots: encoder α^τ, encoder gate, static LM weights β(b_τ) and the running mean
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

