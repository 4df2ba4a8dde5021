"""Self-supervised pretraining of the tiny WavLM, HuBERT iteration-1 style, on speech generated offline.

    python -m tools.pretrain_tiny_wavlm --out tools/fixtures/tiny_wavlm_pretrained --seed 0 \
        --sentences tools/fixtures/tiny_wavlm_pretrained/pretrain_sentences.txt

(the defaults are the committed fixture's settings; the command above regenerates it from the bank it was made from,
the sentence file of that day, kept in the fixture: tools/sentences.txt has changed since. Cost: speech generation about
15 s, then 0.13 s per step (batch 8 x 2 s) on one free core, i.e. about 5.5 min for the 2400 steps; the committed run
took 41 min because it shared the 2 cores with about eight other jobs. A 1200-step run at lr 2e-3 on 600 utterances
reached a held-out masked CE of 3.12 instead of 2.70).

1. Speech: sentences from tools/sentences.txt plus sentences from a phrase grammar (tools/synthetic_text.py),
   spoken by espeak-ng with many voices, pitches and rates, resampled to 16 kHz. A pure function of the seed.
2. Targets: MFCCs (+ deltas, per-utterance mean/variance normalised) at the WavLM frame rate (25 ms window,
   20 ms hop: the same receptive field and stride as the CNN, so frame t of both covers the same samples), clustered
   by sklearn MiniBatchKMeans into ``--units`` discrete units.
3. Masked prediction: spans of frames (start probability ``--mask_prob``, length ``--mask_span``) are replaced by
   WavLM's own ``masked_spec_embed`` (``mask_time_indices``); a linear projection of the last hidden state predicts
   each masked frame's unit; cross-entropy on masked frames only (HuBERT's alpha = 1).

The learning-rate schedule (linear warm-up, then inverse square root) does not depend on the number of steps, so a
short run with the same seed reproduces the first steps of the full one exactly (tests/test_pretrain.py). The output
is a ``save_pretrained`` WavLMModel directory (safetensors + preprocessor config) that every recipe takes as
``wavlm_source``; ``pretrain_log.json`` in it records the settings, the loss curve and the held-out masked loss and
accuracy before and after pretraining. Only the unit projection is dropped: it is not part of WavLM.
"""
import argparse
import io
import json
import random
import shutil
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from safetensors.torch import save_file
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

from tools._pretrain_common import SENTENCES_NAME, read_sentences, save_output, train_steps
from tools.synthetic_text import generated_sentences

CONFIG = Path(__file__).parent / "tiny_configs" / "wavlm.json"
SENTENCES_FILE = Path(__file__).with_name("sentences.txt")
SAMPLE_RATE = 16000
WIN, HOP = 400, 320  # the tiny WavLM CNN's receptive field and stride, in samples
TARGETS_NAME = "ssl_targets.safetensors"

# espeak-ng voices x variants: many "speakers", so the units code phones more than voices
VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


def plan_speech(seed, n_utts, sentences=SENTENCES_FILE):
    """(text, voice, pitch, speed) per utterance: every bank sentence, then grammar sentences."""
    rng = random.Random(f"{seed}-speech")
    bank = read_sentences(sentences)
    texts = (bank * (1 + n_utts // max(1, 4 * len(bank))))[: n_utts // 4]  # a quarter from the bank
    texts += generated_sentences(seed, n_utts - len(texts))
    return [(t, f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}", rng.randint(15, 95), rng.randint(110, 250))
            for t in texts]


def synthesize(spec):
    """One utterance -> float32 tensor at 16 kHz (espeak-ng writes 22.05 kHz 16-bit mono)."""
    text, voice, pitch, speed = spec
    wav_bytes = subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text],
                               check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav_bytes)) as w:
        sr, frames = w.getframerate(), w.readframes(w.getnframes())
    x = torch.from_numpy(np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0)
    return torchaudio.functional.resample(x, sr, SAMPLE_RATE)


def make_speech(seed, n_utts, workers=2, sentences=SENTENCES_FILE):
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("pretrain_tiny_wavlm needs 'espeak-ng' on PATH (Debian package espeak-ng)")
    specs = plan_speech(seed, n_utts, sentences)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(synthesize, specs))


def n_frames(n_samples):
    return max(0, (n_samples - WIN) // HOP + 1)


def mfcc_features(wavs):
    """Per utterance [frames, 39]: MFCC + deltas + delta-deltas, mean/variance normalised per utterance."""
    mfcc = torchaudio.transforms.MFCC(sample_rate=SAMPLE_RATE, n_mfcc=13,
                                      melkwargs={"n_fft": WIN, "win_length": WIN, "hop_length": HOP,
                                                 "n_mels": 40, "center": False})
    return [_mfcc_one(w, mfcc) for w in wavs]


def _mfcc_one(wav, mfcc):
    """Frame t covers samples [HOP t, HOP t + WIN), as WavLM's frame t does."""
    m = mfcc(wav[None])[0]  # [13, T]
    d1 = torchaudio.functional.compute_deltas(m)
    d2 = torchaudio.functional.compute_deltas(d1)
    f = torch.cat([m, d1, d2], 0).T[: n_frames(wav.numel())]
    return (f - f.mean(0)) / (f.std(0) + 1e-5)


def fit_units(feats, n_units, seed):
    """MiniBatchKMeans on all frames -> centroids [n_units, 39]; one thread, so it is the same on any machine."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    x = torch.cat(feats).numpy().astype(np.float64)
    with threadpool_limits(1):
        km = MiniBatchKMeans(n_clusters=n_units, random_state=seed, batch_size=4096, n_init=3, max_iter=100)
        km.fit(x)
    return torch.from_numpy(km.cluster_centers_).float()


def assign_units(feats, centroids):
    """Nearest centroid per frame (the k-means unit), for each utterance."""
    return [torch.cdist(f, centroids).argmin(1) for f in feats]


def span_mask(gen, valid, prob, span):
    """Bool [B, T]: each valid frame starts a masked span of ``span`` frames with probability ``prob``."""
    starts = (torch.rand(valid.shape, generator=gen) < prob) & valid
    mask = torch.zeros_like(valid)
    for k in range(span):
        mask[:, k:] |= starts[:, : valid.shape[1] - k]
    return mask & valid


def _normalize(wavs, sample_mask):
    m = sample_mask.float()
    n = m.sum(1, keepdim=True)
    mean = (wavs * m).sum(1, keepdim=True) / n
    var = (((wavs - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (wavs - mean) / torch.sqrt(var + 1e-7) * m


def make_batch(gen, wavs, units, idx, crop):
    """Random crops of ``crop`` samples (frame-aligned), zero-padded; labels -100 outside each utterance."""
    T = n_frames(crop)
    x = torch.zeros(len(idx), crop)
    smask = torch.zeros(len(idx), crop, dtype=torch.bool)
    labels = torch.full((len(idx), T), -100, dtype=torch.long)
    for b, i in enumerate(idx):
        w, u = wavs[i], units[i]
        n_start = max(1, len(u) - T + 1)
        s = int(torch.randint(n_start, (1,), generator=gen))
        seg = w[s * HOP: s * HOP + crop]
        x[b, : len(seg)] = seg
        smask[b, : len(seg)] = True
        lab = u[s: s + T]
        labels[b, : len(lab)] = lab
    return _normalize(x, smask), smask, labels


def masked_loss(model, proj, x, smask, labels, mask):
    out = model(x, attention_mask=smask.long(), mask_time_indices=mask)
    logits = proj(out.last_hidden_state)
    T = min(logits.shape[1], labels.shape[1])
    logits, labels, mask = logits[:, :T], labels[:, :T], mask[:, :T]
    target = labels.masked_fill(~mask, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    hit = ((logits.argmax(-1) == labels) & mask & (labels >= 0)).sum()
    n = (mask & (labels >= 0)).sum()
    return loss, hit.item(), n.item()


@torch.no_grad()
def evaluate(model, proj, wavs, units, seed, crop, prob, span):
    """Masked-prediction loss / accuracy on held-out utterances, with fixed crops and masks."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 7)
    tot, hits, n = 0.0, 0, 0
    for k in range(0, len(wavs), 16):
        idx = list(range(k, min(len(wavs), k + 16)))
        x, smask, labels = make_batch(gen, wavs, units, idx, crop)
        mask = span_mask(gen, labels >= 0, prob, span)
        loss, h, m = masked_loss(model, proj, x, smask, labels, mask)
        tot, hits, n = tot + loss.item() * m, hits + h, n + m
    model.train()
    return {"loss": tot / n, "accuracy": hits / n}


def tiny_config(mask_prob, span):
    cfg = json.loads(CONFIG.read_text())
    cfg.pop("model_type", None)
    # mask_time_prob > 0 makes WavLMModel own masked_spec_embed (as WavLM-Large does); recipes load with
    # apply_spec_augment=False, so it does not mask anything downstream.
    cfg.update(mask_time_prob=mask_prob, mask_time_length=span)
    return WavLMConfig(**cfg)


def pretrain(out=None, seed=0, steps=2400, n_utts=800, n_units=50, batch_size=8, crop_s=2.0, lr=4e-3,
             warmup=150, mask_prob=0.08, mask_span=5, n_heldout=32, workers=2, log_every=50, verbose=True,
             sentences=SENTENCES_FILE):
    """Run the whole pipeline; writes ``out`` (if given) and returns the log dict."""
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bank_text = Path(sentences).read_text(encoding="utf-8")  # read before ``out`` is replaced (it may hold it)
    wavs = make_speech(seed, n_utts + n_heldout, workers, sentences)
    feats = mfcc_features(wavs)
    centroids = fit_units(feats, n_units, seed)
    units = assign_units(feats, centroids)
    t_data = time.time() - t0
    train_w, train_u = wavs[:n_utts], units[:n_utts]
    held_w, held_u = wavs[n_utts:], units[n_utts:]

    config = tiny_config(mask_prob, mask_span)
    config.apply_spec_augment = True  # lets forward() take mask_time_indices
    model = WavLMModel(config)
    proj = torch.nn.Linear(config.hidden_size, n_units)
    crop = int(crop_s * SAMPLE_RATE)
    before = evaluate(model, proj, held_w, held_u, seed, crop, mask_prob, mask_span)

    def batch_loss():
        idx = torch.randint(n_utts, (batch_size,), generator=gen).tolist()
        x, smask, labels = make_batch(gen, train_w, train_u, idx, crop)
        mask = span_mask(gen, labels >= 0, mask_prob, mask_span)
        return masked_loss(model, proj, x, smask, labels, mask)[0]

    curve = train_steps(model, list(model.parameters()) + list(proj.parameters()), batch_loss, steps, lr, warmup,
                        max_grad_norm=5.0, log_every=log_every, verbose=verbose, loss_name="masked CE")
    after = evaluate(model, proj, held_w, held_u, seed, crop, mask_prob, mask_span)
    log = {
        "command": f"python -m tools.pretrain_tiny_wavlm --out OUT --seed {seed} --steps {steps} --utts {n_utts} "
                   f"--units {n_units}",
        "settings": dict(seed=seed, steps=steps, n_utts=n_utts, n_units=n_units, batch_size=batch_size,
                         crop_s=crop_s, lr=lr, warmup=warmup, mask_prob=mask_prob, mask_span=mask_span,
                         n_heldout=n_heldout),
        "speech_seconds": round(sum(w.numel() for w in train_w) / SAMPLE_RATE, 1),
        "heldout_before": before, "heldout_after": after,
        "train_loss_curve": curve,
        "seconds": {"data": round(t_data, 1), "total": round(time.time() - t0, 1)},
    }
    if verbose:
        print(f"held-out masked CE {before['loss']:.3f} -> {after['loss']:.3f}, "
              f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} ({log['seconds']['total']} s)")
    if out is not None:
        save(model, out, log, bank_text, {"unit_projection.weight": proj.weight.detach(),
                               "unit_projection.bias": proj.bias.detach(), "centroids": centroids})
    log["_model"], log["_targets"] = model, {"proj": proj, "centroids": centroids}
    return log


def save(model, out, log, bank_text, targets):
    """save_pretrained into a sibling temp dir, then swap it in whole. ``targets`` (unit projection and k-means
    centroids, a few KB) go to TARGETS_NAME so that the masked prediction can be re-evaluated later; WavLMModel
    loaders read only model.safetensors."""
    model.config.apply_spec_augment = False  # the tiny config's value: no masking unless a recipe asks

    def write_model(folder):
        model.save_pretrained(folder, safe_serialization=True)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=True).save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in targets.items()}, str(folder / TARGETS_NAME))

    return save_output(out, log, bank_text, write_model, "pretrain_tiny_wavlm")


def load_pretrained(directory):
    """(WavLMModel ready to take mask_time_indices, unit projection, centroids) from a directory this tool wrote."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / TARGETS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: not written by tools.pretrain_tiny_wavlm (no {TARGETS_NAME})")
    t = load_file(str(path))
    proj = torch.nn.Linear(t["unit_projection.weight"].shape[1], t["unit_projection.weight"].shape[0])
    proj.load_state_dict({"weight": t["unit_projection.weight"], "bias": t["unit_projection.bias"]})
    model = WavLMModel.from_pretrained(directory, apply_spec_augment=True)
    return model, proj, t["centroids"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--utts", type=int, default=800, help="generated training utterances")
    p.add_argument("--units", type=int, default=50, help="k-means units (prediction targets)")
    p.add_argument("--workers", type=int, default=2, help="parallel espeak-ng processes")
    p.add_argument("--sentences", default=str(SENTENCES_FILE),
                   help=f"sentence bank (one a line, '#' comments); a copy goes to OUT/{SENTENCES_NAME}")
    a = p.parse_args(argv)
    pretrain(a.out, seed=a.seed, steps=a.steps, n_utts=a.utts, n_units=a.units, workers=a.workers,
             sentences=a.sentences)
    print(a.out)


if __name__ == "__main__":
    main()
