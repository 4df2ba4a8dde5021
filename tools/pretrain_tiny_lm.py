"""Pretrain the tiny causal LM (tools/tiny_configs/causal_lm.json + the character tokenizer) on text.

    python -m tools.pretrain_tiny_lm --out tools/fixtures/tiny_lm_pretrained --seed 0 \
        --sentences tools/fixtures/tiny_lm_pretrained/pretrain_sentences.txt

(the defaults are the committed fixture's settings; the command above regenerates it from the copy of the banks it
was trained on (tools/sentences.txt by default): 400 steps, 205 s measured on
this project's 2-core machine while it was shared with other jobs).

Text: the sentence banks of the mini corpora, tools/sentences.txt (all pools; every ``--holdout_every``-th sentence
held out to measure perplexity)
plus sentences from the phrase grammar (tools/synthetic_text.py) and any ``--text`` files (one sentence a line);
half of each batch comes from the banks, half from the grammar. The grammar is narrow: trained longer, the model
fits it and its held-out bank perplexity rises again (on the earlier 60-sentence bank: about 11 at 300-400 steps,
13 at 500, and 48 after 1200 steps of grammar-only batches), hence the short default run. The fixture: 61.3 -> 10.3.
Each sentence is seen both as written and in the normalised transcript form (``lobes.ctc_text``: upper case,
letters, apostrophes and spaces), the form HarmoniFuse's ASR targets take. Training is next-character
cross-entropy, ``<bos> text <eos>``, deterministic from the seed. The output is a ``save_pretrained`` directory plus
``char_tokenizer.json``, which ``SpeechLM(encoder, lm=DIR)`` loads like any checkpoint; ``pretrain_log.json`` records
the settings and the held-out perplexity before and after.
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from lobes.ctc_text import normalize_transcript
from lobes.errors import DataError
from lobes.harmonifuse.lm_loading import CharTokenizer
from tools._pretrain_common import SENTENCES_NAME, read_sentences, save_output, train_steps
from tools.synthetic_text import generated_sentences

CONFIG = Path(__file__).parent / "tiny_configs" / "causal_lm.json"
SENTENCES_FILE = Path(__file__).with_name("sentences.txt")

def split_text(seed, n_generated, holdout_every, extra_files=(), sentences=SENTENCES_FILE):
    """(bank training sentences, grammar sentences, held-out bank sentences in transcript form).

    Training sentences come in both surface forms (as written, and normalised)."""
    bank = read_sentences(sentences)
    heldout = [s for i, s in enumerate(bank) if holdout_every and i % holdout_every == holdout_every - 1]
    held = set(heldout)
    train = [s for s in bank if s not in held]
    for f in extra_files:
        train += [s for s in read_sentences(f) if s not in held]
    grammar = generated_sentences(seed, n_generated)
    both = lambda xs: xs + [normalize_transcript(s) for s in xs]  # noqa: E731
    return both(train), both(grammar), [normalize_transcript(s) for s in heldout]


def encode_batch(tokenizer, texts):
    """ids [B, S] = <bos> text <eos> <pad>...; labels the same with -100 at pads."""
    seqs = [[tokenizer.bos_token_id] + tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), tokenizer.pad_token_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    attn = ids != tokenizer.pad_token_id
    attn[:, 0] = True
    return ids, attn, ids.masked_fill(~attn, -100)


def lm_loss(model, ids, attn, labels):
    logits = model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum"), (labels[:, 1:] != -100).sum()


@torch.no_grad()
def perplexity(model, tokenizer, texts):
    """exp(mean next-token cross-entropy) over ``texts``, the <eos> prediction included."""
    model.eval()
    ids, attn, labels = encode_batch(tokenizer, texts)
    total, n = lm_loss(model, ids, attn, labels)
    model.train()
    return math.exp(total.item() / n.item())


def build_model(seed):
    cfg = json.loads(CONFIG.read_text())
    model_type = cfg.pop("model_type")
    tokenizer = CharTokenizer()
    if len(tokenizer) > cfg["vocab_size"]:
        raise DataError(f"{CONFIG}: vocab_size {cfg['vocab_size']} < {len(tokenizer)} tokenizer symbols")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)), tokenizer


def pretrain(out=None, seed=0, steps=400, batch_size=32, lr=3e-3, warmup=100, n_generated=4000, bank_fraction=0.5,
             holdout_every=5, extra_files=(), log_every=100, verbose=True, sentences=SENTENCES_FILE):
    t0 = time.time()
    model, tokenizer = build_model(seed)
    bank_text = Path(sentences).read_text(encoding="utf-8")  # read before ``out`` is replaced (it may hold it)
    bank, grammar, heldout = split_text(seed, n_generated, holdout_every, extra_files, sentences)
    rng = random.Random(f"{seed}-lm-batches")
    before = perplexity(model, tokenizer, heldout) if heldout else None

    def batch_loss():
        # bank_fraction of each batch from the sentence banks, the rest from the grammar: the grammar alone
        # is narrow enough that a long run fits it and drifts away from the banks' sentences
        texts = [rng.choice(bank if rng.random() < bank_fraction else grammar) for _ in range(batch_size)]
        total, n = lm_loss(model, *encode_batch(tokenizer, texts))
        return total / n

    def progress():
        return f", held-out perplexity {perplexity(model, tokenizer, heldout):.2f}" if heldout else ""

    curve = train_steps(model, list(model.parameters()), batch_loss, steps, lr, warmup, max_grad_norm=1.0,
                        log_every=log_every, verbose=verbose, progress=progress)
    after = perplexity(model, tokenizer, heldout) if heldout else None
    log = {
        "command": f"python -m tools.pretrain_tiny_lm --out OUT --seed {seed} --steps {steps}",
        "settings": dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                         n_generated=n_generated, bank_fraction=bank_fraction, holdout_every=holdout_every,
                         extra_files=[str(f) for f in extra_files]),
        "train_sentences": {"bank": len(bank), "grammar": len(grammar)}, "heldout_sentences": len(heldout),
        "heldout_perplexity_before": before, "heldout_perplexity_after": after,
        "train_loss_curve": curve, "seconds": round(time.time() - t0, 1),
    }
    if verbose and heldout:
        print(f"held-out bank perplexity {before:.2f} -> {after:.2f} ({log['seconds']} s)")
    if out is not None:
        save(model, tokenizer, out, log, bank_text)
    log["_model"], log["_tokenizer"] = model, tokenizer
    return log


def save(model, tokenizer, out, log, bank_text):
    def write_model(folder):
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return save_output(out, log, bank_text, write_model, "pretrain_tiny_lm")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--bank_fraction", type=float, default=0.5, help="share of each batch drawn from the banks")
    p.add_argument("--holdout_every", type=int, default=5, help="hold out every n-th bank sentence (0: none)")
    p.add_argument("--text", nargs="*", default=[], help="extra sentence files, one sentence a line")
    p.add_argument("--sentences", default=str(SENTENCES_FILE),
                   help=f"sentence bank (one a line, '#' comments); a copy goes to OUT/{SENTENCES_NAME}")
    a = p.parse_args(argv)
    pretrain(a.out, seed=a.seed, steps=a.steps, bank_fraction=a.bank_fraction, holdout_every=a.holdout_every,
             extra_files=a.text, sentences=a.sentences)
    print(a.out)


if __name__ == "__main__":
    main()
