"""Targets of the speech LM and their loss: token ids for teacher forcing, class indices for the classify head,
and the token cross-entropy summed in chunks whose logits are rebuilt in backward."""
import torch
import torch.nn.functional as F

from lobes.errors import DataError


def target_token_ids(tokenizer, targets):
    """Target texts -> token id lists, each ending with EOS."""
    ids = []
    for i, text in enumerate(targets):
        if not isinstance(text, str):
            raise DataError(f"target {i} is a {type(text).__name__}, expected text")
        ids.append(list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id])
    return ids


def label_indices(targets, emotions, device):
    """Class names (from ``emotions``) or indices -> a long tensor on ``device``."""
    if isinstance(targets, torch.Tensor):
        return targets.long().to(device, non_blocking=True)
    idx = []
    for t in targets:
        if isinstance(t, str):
            if t not in emotions:
                raise DataError(f"emotion label '{t}' is not one of {emotions}")
            idx.append(emotions.index(t))
        else:
            idx.append(int(t))
    return torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)


def teacher_forcing_tensors(tgt, device):
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
