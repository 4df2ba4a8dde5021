"""Decoding for the HarmoniFuse speech LM: transformers ``generate`` (greedy or beam search, batched, KV cache)
on :class:`FusedHeadLM`, a ``PreTrainedModel`` view of the speech LM whose forward applies the same LM-layer
fusion as training: α comes from the prefill step (the prefix) and is carried to every later step, so
generation scores exactly what training scores. Generation prefixes are left-padded with a mask.
"""
import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


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


def left_padded(embeds, mask):
    """Right-padded [B, K, D] + mask -> the same rows left-padded (real positions last), for ``generate``."""
    K = embeds.shape[1]
    src = torch.arange(K, device=embeds.device)[None] - (K - mask.sum(1))[:, None]
    left = src >= 0
    out = torch.gather(embeds, 1, src.clamp(min=0)[:, :, None].expand(-1, -1, embeds.shape[2]))
    return out.masked_fill(~left[:, :, None], 0.0), left


def generate_text(speech_lm, prefix, mask, task, max_len=200, num_beams=1, length_penalty=1.0):
    """Decode from right-padded prefix embeddings [B, K, D] and their mask [B, K] -> list of strings (EOS and
    what follows it cut). ``max_len`` = new tokens, EOS included; ``length_penalty`` is HF's (beam score =
    Σ log p / length^length_penalty)."""
    tokenizer = speech_lm.tokenizer
    embeds, attn = left_padded(prefix, mask)
    eos = tokenizer.eos_token_id
    pad = getattr(tokenizer, "pad_token_id", None)
    config = GenerationConfig(
        max_new_tokens=int(max_len), do_sample=False, num_beams=int(num_beams), num_return_sequences=1,
        length_penalty=float(length_penalty), early_stopping=num_beams > 1,
        eos_token_id=eos, pad_token_id=eos if pad is None else pad,
        bos_token_id=getattr(tokenizer, "bos_token_id", None), use_cache=True)
    seqs = FusedHeadLM(speech_lm, task).generate(inputs_embeds=embeds, attention_mask=attn.long(),
                                                 generation_config=config)
    out = []
    for row in seqs.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


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
