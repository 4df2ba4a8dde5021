"""The pretrained tiny bases (tools/pretrain_tiny_wavlm.py, tools/pretrain_tiny_lm.py) and their fixtures."""
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tools" / "fixtures"
WAVLM_FIXTURE = FIXTURES / "tiny_wavlm_pretrained"
LM_FIXTURE = FIXTURES / "tiny_lm_pretrained"

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _size(directory):
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def test_fixtures_are_small_and_load_through_the_recipe_paths():
    from lobes.harmonifuse.lm_loading import CharTokenizer, load_causal_lm, load_tokenizer
    from lobes.wavlm_encoder import WavLMEncoder

    assert _size(FIXTURES) < 5 * 2 ** 20
    tiny = json.loads((REPO_ROOT / "tools" / "tiny_configs" / "wavlm.json").read_text())
    enc = WavLMEncoder(str(WAVLM_FIXTURE), freeze=True)
    assert (enc.hidden_size, enc.num_layers) == (tiny["hidden_size"], tiny["num_hidden_layers"])
    assert enc.model.config.apply_spec_augment is False  # recipes see no masking
    hidden, mask = enc(torch.randn(2, 16000), torch.tensor([1.0, 0.5]))
    # 16000 samples -> 49 frames with the CNN's 400-sample field and 320 stride; the half-length one has 24
    assert hidden.shape == (5, 2, 49, 32) and mask.sum(1).tolist() == [49, 24]
    assert isinstance(load_tokenizer(LM_FIXTURE), CharTokenizer)
    assert load_causal_lm(LM_FIXTURE).config.num_hidden_layers == 4


def test_wavlm_fixture_log_masked_loss_fell():
    log = json.loads((WAVLM_FIXTURE / "pretrain_log.json").read_text())
    before, after = log["heldout_before"], log["heldout_after"]
    k = log["settings"]["n_units"]
    # random init predicts about uniformly: masked CE near ln(K) (within 5%), accuracy near 1/K
    assert abs(before["loss"] - math.log(k)) < 0.05 * math.log(k)
    assert after["loss"] < 0.8 * before["loss"]
    assert after["accuracy"] > 8 / k


@needs_espeak
def test_wavlm_fixture_predicts_masked_units_of_unseen_speech():
    """Fresh speech (another seed), units from the fixture's own k-means centroids: masked frames are predicted
    far better than by the unit prior, and far better than the same head on a random-init WavLM."""
    from tools.make_tiny_wavlm import make_tiny_wavlm  # noqa: F401  (same config family)
    from tools.pretrain_tiny_wavlm import (SAMPLE_RATE, assign_units, evaluate, load_pretrained, make_speech,
                                           mfcc_features, tiny_config)
    from transformers import WavLMModel

    s = json.loads((WAVLM_FIXTURE / "pretrain_log.json").read_text())["settings"]
    model, proj, centroids = load_pretrained(WAVLM_FIXTURE)
    wavs = make_speech(seed=99, n_utts=24)
    units = assign_units(mfcc_features(wavs), centroids)
    args = (wavs, units, 99, int(s["crop_s"] * SAMPLE_RATE), s["mask_prob"], s["mask_span"])
    pre = evaluate(model, proj, *args)
    torch.manual_seed(0)
    cfg = tiny_config(s["mask_prob"], s["mask_span"])
    cfg.apply_spec_augment = True
    rand = evaluate(WavLMModel(cfg), proj, *args)
    counts = Counter(torch.cat(units).tolist())
    p = torch.tensor(list(counts.values()), dtype=torch.float) / sum(counts.values())
    prior_ce = -(p * p.log()).sum().item()  # the best context-free predictor
    assert pre["loss"] < 0.9 * prior_ce
    assert pre["loss"] < 0.8 * rand["loss"]
    assert pre["accuracy"] > 2 * p.max().item()


@needs_espeak
def test_wavlm_pretraining_is_deterministic_from_the_seed():
    from tools.pretrain_tiny_wavlm import pretrain

    kw = dict(steps=3, n_utts=12, n_units=8, n_heldout=4, batch_size=4, verbose=False)
    a, b, c = pretrain(seed=0, **kw), pretrain(seed=0, **kw), pretrain(seed=1, **kw)
    sa, sb, sc = (x["_model"].state_dict() for x in (a, b, c))
    assert a["train_loss_curve"] == b["train_loss_curve"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.layers.0.feed_forward.output_dense.weight"],
                           sc["encoder.layers.0.feed_forward.output_dense.weight"])


@needs_espeak
@pytest.mark.slow
def test_wavlm_fixture_command_reproduces_its_first_steps():
    """The fixture's settings, few steps: the same speech, units and loss curve as the committed run (the LR
    schedule does not depend on the step count, so a short run is a prefix of the long one)."""
    from tools.pretrain_tiny_wavlm import pretrain

    log = json.loads((WAVLM_FIXTURE / "pretrain_log.json").read_text())
    s = dict(log["settings"])
    s["steps"] = 8
    short = pretrain(verbose=False, sentences=WAVLM_FIXTURE / "pretrain_sentences.txt", **s)
    assert short["heldout_before"]["loss"] == pytest.approx(log["heldout_before"]["loss"], rel=1e-5)
    assert short["train_loss_curve"] == pytest.approx(log["train_loss_curve"][:8], rel=1e-4)


def test_lm_fixture_heldout_perplexity_far_below_random_init():
    from tools.pretrain_tiny_lm import build_model, perplexity, split_text

    log = json.loads((LM_FIXTURE / "pretrain_log.json").read_text())
    s = log["settings"]
    bank = LM_FIXTURE / "pretrain_sentences.txt"
    _, _, heldout = split_text(s["seed"], s["n_generated"], s["holdout_every"], sentences=bank)
    from lobes.harmonifuse.lm_loading import load_causal_lm, load_tokenizer

    lm, tok = load_causal_lm(LM_FIXTURE), load_tokenizer(LM_FIXTURE)
    rand, _ = build_model(seed=0)
    ppl_pre, ppl_rand = perplexity(lm, tok, heldout), perplexity(rand, tok, heldout)
    n_bank = sum(1 for ln in bank.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    assert len(heldout) == n_bank // 5 == log["heldout_sentences"]  # every 5th bank sentence, never trained on
    assert ppl_rand > 40  # about the 64-symbol vocabulary
    assert ppl_pre < 0.25 * ppl_rand
    assert ppl_pre == pytest.approx(log["heldout_perplexity_after"], rel=1e-4)


def test_lm_short_run_deterministic_and_perplexity_falls():
    from tools.pretrain_tiny_lm import pretrain

    kw = dict(steps=60, batch_size=16, warmup=20, n_generated=300, verbose=False)
    a, b = pretrain(**kw), pretrain(**kw)
    assert a["train_loss_curve"] == b["train_loss_curve"]
    sa, sb = a["_model"].state_dict(), b["_model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # 62.5 -> 17.3 measured (60-sentence bank): well below the random-init perplexity after 60 steps
    assert a["heldout_perplexity_before"] > 40
    assert a["heldout_perplexity_after"] < 0.4 * a["heldout_perplexity_before"]
