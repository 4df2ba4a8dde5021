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
    """Class names (from ``emotions``) or indices -> a long tensor on ``device``; soft labels (a float tensor
    [B, C], one distribution over ``emotions`` per row) stay probabilities (``F.cross_entropy`` then gives the soft
    CE, -Σ_c p_c log q_c, averaged over the batch)."""
    if isinstance(targets, torch.Tensor) and targets.is_floating_point() and targets.dim() == 2:
        if targets.shape[1] != len(emotions):
            raise DataError(f"soft labels of shape {tuple(targets.shape)}: expected [batch, {len(emotions)}]")
        return targets.float().to(device, non_blocking=True)
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


def _weighted_ce_sum(hidden, targets, weights, head):
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()


def weighted_token_nll(hidden, targets, weights, head, chunk=None):
    """Σ_m w_m · NLL_m of ``head(hidden)`` [M, V] against ``targets`` [M]; with ``chunk`` in chunks whose logits
    are rebuilt in backward (as :func:`chunked_cross_entropy`), else all at once."""
    from torch.utils.checkpoint import checkpoint

    if chunk is None:
        return _weighted_ce_sum(hidden, targets, weights, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_weighted_ce_sum, hidden[i:i + chunk], targets[i:i + chunk],
                                   weights[i:i + chunk], head, use_reentrant=False)
    return total


def soft_target_pairs(soft, emotions, *rows):
    """SER soft labels [B, C] (host; rows are distributions over ``emotions``) -> one teacher-forced sequence per
    (utterance, class) pair with p > 0: (each of ``rows`` ([B, ...] tensors, e.g. the speech embeddings and their
    mask) repeated for its utterance's pairs [P, ...], the pairs' target words [P], their p [P]).

    The generative SER loss on soft labels is the expected NLL of the emotion word, Σ_c p_c · NLL(word_c), so each
    utterance's prefix is scored once per class it gives mass to (a one-hot row gives one pair: the hard loss).
    """
    soft = torch.as_tensor(soft, dtype=torch.float32).cpu()
    if soft.dim() != 2 or soft.shape[1] != len(emotions):
        raise DataError(f"soft labels of shape {tuple(soft.shape)}: expected [batch, {len(emotions)}] "
                        f"(one probability per class of {list(emotions)})")
    utt, cls = torch.nonzero(soft > 0, as_tuple=True)
    picked = [r.index_select(0, utt.to(r.device)) for r in rows]
    return (*picked, [emotions[c] for c in cls.tolist()], soft[utt, cls])


def token_weights(tgt, weights):
    """Per real target token (row-major, as ``teacher_forcing_tensors``'s flat indices) its sequence's weight."""
    return torch.repeat_interleave(torch.as_tensor(weights, dtype=torch.float32),
                                   torch.tensor([len(y) for y in tgt], dtype=torch.long))


def soft_target_loss(fused, target_ids, flat, tgt, weights, head, chunk=None):
    """Soft-label SER loss of teacher-forced (utterance, class) sequences: Σ p·NLL over their real target tokens
    divided by Σ p·(tokens), which is the hard loss (mean NLL over the batch's target tokens) for one-hot labels.
    ``fused`` [S, N, D] states at the target positions, ``target_ids`` [S, N], ``flat`` / ``tgt`` from
    :func:`teacher_forcing_tensors` / :func:`target_token_ids`, ``weights`` [S] (host) the pairs' p."""
    w = token_weights(tgt, weights).to(fused.device, non_blocking=True)
    S, N = target_ids.shape
    nll = weighted_token_nll(fused.reshape(S * N, -1).index_select(0, flat), target_ids.reshape(-1).index_select(0, flat),
                             w, head, chunk)
    return nll / w.sum()
