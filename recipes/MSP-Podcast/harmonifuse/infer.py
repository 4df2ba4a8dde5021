#!/usr/bin/env python3
"""Transcribe and name the emotion of audio files with a trained HarmoniFuse experiment.

    python recipes/MSP-Podcast/harmonifuse/infer.py --model exp/harmonifuse/full/1986 clip.wav folder/ \
        [--device cuda] [--num_beams 4] [--batch_seconds 60] [--json out.json]

``--model``: a HarmoniFuse ``output_folder`` (its ``hyperparams.yaml`` and best checkpoint under ``save/``; the
frozen base LM / WavLM are re-read from the sources named there, override with ``--lm_source`` /
``--wavlm_source`` when they moved). Folders are searched recursively for .wav/.flac/.ogg/.mp3; any sample rate
and channel count (downmixed, resampled to 16 kHz). Files are decoded in batches of at most ``--batch_seconds``
of padded audio; every trained task runs (ASR: transcript; SER: emotion word, "<invalid>" when the generated
text is no class name). A file that cannot be read is reported with its error and the rest are still predicted.

Exit code: 0 all files predicted, 1 some failed (listed on stderr), 2 bad model directory / no input files.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def load_harmonifuse(exp_dir, device="cpu", overrides=None):
    """(SpeechLM in eval mode with the best checkpoint loaded, hparams) of a HarmoniFuse experiment folder.

    The experiment is rebuilt by the toolkit's one loader (``lobes.inference.load_experiment``); its checkpoint
    holds the trainable parameters only (recoverable ``speech_lm``), the frozen LM / WavLM are re-read from their
    sources (``overrides`` as there, e.g. ``{"speech_lm": {"lm": {"source": "/models/lm"}}}``).
    """
    from lobes.errors import DataError
    from lobes.inference import load_experiment

    exp = load_experiment(exp_dir, overrides, weights=["speech_lm"])
    if "speech_lm" not in exp.modules:
        raise DataError(f"{exp.path / 'hyperparams.yaml'}: no 'speech_lm' module; not a HarmoniFuse experiment")
    return exp.modules["speech_lm"].to(device).eval(), exp.hparams


def predict(model, hparams, paths, device="cpu", batch_seconds=60.0, num_beams=None):
    """One dict per file: ``file``, ``transcript`` / ``emotion`` (trained tasks), or ``error``."""
    from lobes.audio import read_audio
    from lobes.errors import DataError
    from lobes.inference import SAMPLE_RATE, duration_batches

    results = {p: {"file": p} for p in paths}
    loaded = {}
    for p in paths:
        try:
            loaded[p] = read_audio(p, SAMPLE_RATE, convert=True)
        except DataError as e:
            results[p]["error"] = str(e)
    good = list(loaded)
    beams = hparams["num_beams"] if num_beams is None else num_beams
    classes = list(model.emotions)
    for batch in duration_batches([len(loaded[p]) / SAMPLE_RATE for p in good], batch_seconds):
        names = [good[i] for i in batch]
        n = max(len(loaded[p]) for p in names)
        wavs = torch.zeros(len(names), n)
        for i, p in enumerate(names):
            wavs[i, : len(loaded[p])] = loaded[p]
        lens = torch.tensor([len(loaded[p]) / n for p in names])
        wavs, lens = wavs.to(device), lens.to(device)
        for task in hparams["train_tasks"]:
            max_len = hparams["asr_max_decode_len"] if task == "asr" else hparams["ser_max_decode_len"]
            hyps = model.generate(wavs, lens, task, max_len=max_len, num_beams=beams,
                                  length_penalty=hparams["length_penalty"])
            for p, h in zip(names, hyps):
                if task == "asr":
                    results[p]["transcript"] = h
                else:
                    results[p]["emotion"] = h.strip() if h.strip() in classes else "<invalid>"
                    results[p]["generated"] = h
    return [results[p] for p in paths]


def main(argv=None):
    from lobes.errors import DataError
    from lobes.inference import find_audio_files
    from lobes.io_utils import atomic_write

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num_beams", type=int, default=None, help="default: the experiment's num_beams")
    ap.add_argument("--batch_seconds", type=float, default=60.0)
    ap.add_argument("--lm_source", help="where the LM is now, when it moved")
    ap.add_argument("--wavlm_source", help="where the WavLM is now, when it moved")
    ap.add_argument("--json", help="write every file's result here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # the saved hyperparams.yaml has its references resolved: override the modules' own keys
    overrides = {}
    if a.lm_source:
        overrides["speech_lm"] = {"lm": {"source": a.lm_source}}
    if a.wavlm_source:
        overrides["wavlm"] = {"source": a.wavlm_source}
    paths = find_audio_files(a.inputs)
    if not paths:
        print("no input audio files found", file=sys.stderr)
        return 2
    try:
        model, hparams = load_harmonifuse(a.model, a.device, overrides)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predict(model, hparams, paths, a.device, a.batch_seconds, a.num_beams)
    for r in results:
        status = "FAILED" if "error" in r else "ok"
        print(f"{r['file']}\t{r.get('emotion', '-')}\t{r.get('transcript', '-')}\t{status}")
    if a.json:
        with atomic_write(a.json) as f:
            json.dump(results, f, indent=2)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    sys.exit(main())
