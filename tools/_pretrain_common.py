"""What tools/pretrain_tiny_lm.py and tools/pretrain_tiny_wavlm.py share: the sentence bank, the optimisation
loop (AdamW, warm-up then inverse square root, gradient clipping, loss curve, progress lines) and the output folder
(``save_pretrained`` files + the bank + ``pretrain_log.json``, swapped in whole).

The loop draws no random numbers itself, so each tool's batches and masks keep their RNG call order.
"""
import json
import math
from pathlib import Path

import torch

from lobes.errors import DataError
from lobes.io_utils import atomic_dir, atomic_write

LOG_NAME = "pretrain_log.json"  # also marks a folder these tools wrote (only such a folder is replaced)
SENTENCES_NAME = "pretrain_sentences.txt"  # the bank it was trained on (held-out lines included), for regeneration


def read_sentences(path):
    """Non-empty lines of a text file, ``#`` comment lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read text file ({e})") from e
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def train_steps(model, params, batch_loss, steps, lr, warmup, max_grad_norm, log_every=50, verbose=True,
                loss_name="CE", progress=None):
    """Run ``steps`` optimiser steps on ``batch_loss()`` and return the loss curve (rounded to 6 decimals).

    ``progress()``, if given, returns text appended to every ``log_every``-th progress line (e.g. a held-out
    perplexity). The schedule (linear warm-up, then inverse square root) does not depend on ``steps``, so a short
    run is a prefix of a long one with the same seed.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else math.sqrt(warmup / (s + 1)))
    curve = []
    model.train()
    for step in range(steps):
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        curve.append(round(loss.item(), 6))
        if verbose and (step + 1) % log_every == 0:
            extra = progress() if progress else ""
            print(f"step {step + 1}/{steps}  {loss_name} {sum(curve[-log_every:]) / log_every:.3f}{extra}",
                  flush=True)
    return curve


def save_output(out, log, bank_text, write_model, tool):
    """Write ``out`` in a staging folder and swap it in whole: ``write_model(folder)`` writes the model files,
    then the bank text and the log (its ``_``-prefixed entries, live objects, left out) are added."""
    with atomic_dir(out, LOG_NAME, tool) as stage:
        write_model(stage)
        (stage / SENTENCES_NAME).write_text(bank_text, encoding="utf-8")
        with atomic_write(stage / LOG_NAME) as f:
            json.dump({k: v for k, v in log.items() if not k.startswith("_")}, f, indent=1)
    return Path(out)
