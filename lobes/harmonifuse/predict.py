"""Predictions of a HarmoniFuse speech LM for audio files: transcript, emotion word and one score per class.

Used by the recipe's ``infer.py`` (an experiment folder) and by a shared folder's loading snippet
(:func:`lobes.harmonifuse.artefacts.load_artefacts`): both decode with the experiment's settings
(``decoding``: ``train_tasks``, ``asr_max_decode_len``, ``ser_max_decode_len``, ``num_beams``, ``length_penalty``).
"""
import torch

from lobes.errors import DataError

INVALID = "<invalid>"


@torch.no_grad()
def emotion_scores(model, wavs, wav_lens):
    """[B, C] probabilities of the model's emotion classes for a padded batch.

    ``ser_mode="classify"``: the head's softmax. ``"generate"``: the softmax over classes of each class word's
    log-likelihood (its tokens and EOS, teacher-forced after the utterance's prefix), so the scores rank what the
    LM would generate and sum to 1 over the classes.
    """
    task = model.ser_task
    if model._is_classify(task):
        speech, smask = model.encode_speech(wavs, wav_lens, task)
        out = model._classify(*model.prefix_embeddings(speech, smask, task), task, None, speech.device)
        return out.logits.softmax(-1)
    B = wavs.shape[0]
    ll = []
    for emotion in model.emotions:
        out = model(wavs, wav_lens, task, [emotion] * B)
        logp = out.logits.float().log_softmax(-1)
        valid = out.target_ids != -100
        tok = logp.gather(-1, out.target_ids.clamp(min=0)[..., None])[..., 0]
        ll.append((tok * valid).sum(1))
    return torch.stack(ll, 1).softmax(-1)


def _batch(loaded, names, device):
    n = max(len(loaded[p]) for p in names)
    wavs = torch.zeros(len(names), n)
    for i, p in enumerate(names):
        wavs[i, : len(loaded[p])] = loaded[p]
    lens = torch.tensor([len(loaded[p]) / n for p in names])
    return wavs.to(device), lens.to(device)


def predict(model, decoding, paths, device="cpu", batch_seconds=60.0, num_beams=None):
    """One dict per file: ``file``; per trained task ``transcript`` (ASR) or ``emotion`` (a class name or
    "<invalid>"), ``generated`` (the words) and ``scores`` ({class: probability}, :func:`emotion_scores`) (SER);
    or ``error`` when the file cannot be read."""
    from lobes.audio import read_audio
    from lobes.inference import SAMPLE_RATE, duration_batches

    results = {p: {"file": p} for p in paths}
    loaded = {}
    for p in paths:
        try:
            loaded[p] = read_audio(p, SAMPLE_RATE, convert=True)
        except DataError as e:
            results[p]["error"] = str(e)
    good = list(loaded)
    beams = decoding["num_beams"] if num_beams is None else num_beams
    classes = list(model.emotions)
    for batch in duration_batches([len(loaded[p]) / SAMPLE_RATE for p in good], batch_seconds):
        names = [good[i] for i in batch]
        wavs, lens = _batch(loaded, names, device)
        for task in decoding["train_tasks"]:
            max_len = decoding["asr_max_decode_len"] if task == "asr" else decoding["ser_max_decode_len"]
            hyps = model.generate(wavs, lens, task, max_len=max_len, num_beams=beams,
                                  length_penalty=decoding["length_penalty"])
            scores = emotion_scores(model, wavs, lens).cpu() if task == model.ser_task else None
            for b, (p, h) in enumerate(zip(names, hyps)):
                if task == "asr":
                    results[p]["transcript"] = h
                else:
                    results[p]["emotion"] = h.strip() if h.strip() in classes else INVALID
                    results[p]["generated"] = h
                    results[p]["scores"] = {c: float(s) for c, s in zip(classes, scores[b].tolist())}
    return [results[p] for p in paths]
