"""CTC loss and greedy decoding on a CTC head's log-probabilities, called from the recipes' train.py."""
import torch

from lobes import ctc_text


def ctc_loss(log_probs, mask, tokens, token_rel_lens):
    """Mean CTC loss of log-probabilities [B, T, V] (frame mask [B, T]) against padded character ids."""
    token_lens = torch.round(token_rel_lens * tokens.shape[1]).long()
    return torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1), tokens, mask.sum(1), token_lens, blank=ctc_text.CHAR_TO_INDEX[ctc_text.BLANK],
        reduction="mean", zero_infinity=True)


def greedy_hyps(log_probs, mask):
    """Greedy (best-path) transcripts of a batch."""
    return ctc_text.ctc_greedy_decode(log_probs.detach(), mask.sum(1))
