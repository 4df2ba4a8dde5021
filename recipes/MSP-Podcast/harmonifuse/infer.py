#!/usr/bin/env python3
"""Transcribe and name the emotion of audio files with a trained HarmoniFuse experiment.

    python recipes/MSP-Podcast/harmonifuse/infer.py --model exp/harmonifuse/full/1986 clip.wav folder/ \
        [--device cuda] [--num_beams 4] [--batch_seconds 60] [--json out.json]

``--model``: a HarmoniFuse ``output_folder`` or an export of ``tools/export_harmonifuse.py``, read from its shared
artefacts (``speech_modules.safetensors`` + ``.json``, ``lm_adapter/`` or ``lm/``; ``lobes.harmonifuse.artefacts``);
an experiment trained before those were written is read from its best checkpoint under ``save/``. A base LM /
frozen WavLM is re-read from the source named there: ``--lm_source`` / ``--wavlm_source`` say where it is now
when it moved. Folders are searched recursively for .wav/.flac/.ogg/.mp3; any sample rate and channel count
(downmixed, resampled to 16 kHz). Files are decoded in batches of at most ``--batch_seconds`` of padded audio;
every trained task runs (ASR: transcript; SER: emotion word, "<invalid>" when the generated text is no class
name, and ``scores``, a probability per class). A file that cannot be read is reported with its error and the
rest are still predicted.

Exit code: 0 all files predicted, 1 some failed (listed on stderr), 2 bad model directory / no input files.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def load_checkpoint(exp_dir, device="cpu", overrides=None):
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


def load_harmonifuse(model_dir, device="cpu", lm_source=None, wavlm_source=None):
    """(SpeechLM in eval mode, decoding settings) of an experiment or an export folder.

    A folder with ``speech_modules.json`` (written after the test, or by ``tools/export_harmonifuse.py``) is read
    from its shared artefacts (``lobes.harmonifuse.artefacts``); an experiment trained before those existed, from
    its best checkpoint (:func:`load_checkpoint`). ``lm_source`` / ``wavlm_source``: where the LM / WavLM are now.
    """
    from lobes.harmonifuse.artefacts import INFO_FILE, load_artefacts
    from lobes.inference import find_experiment

    folder = Path(model_dir)
    if not (folder / INFO_FILE).is_file():
        folder = find_experiment(folder)
    if (folder / INFO_FILE).is_file():
        model, info = load_artefacts(folder, lm_source, wavlm_source, device)
        return model, info["decoding"]
    logger.info("%s: no %s (trained before shared artefacts were written): loading the checkpoint", folder,
                INFO_FILE)
    # the saved hyperparams.yaml has its references resolved: override the modules' own keys
    overrides = {}
    if lm_source:
        overrides["speech_lm"] = {"lm": {"source": lm_source}}
    if wavlm_source:
        overrides["wavlm"] = {"source": wavlm_source}
    return load_checkpoint(folder, device, overrides)


def predict(model, decoding, paths, device="cpu", batch_seconds=60.0, num_beams=None):
    """One dict per file (``lobes.harmonifuse.predict.predict``): ``file``, ``transcript`` / ``emotion``,
    ``generated``, ``scores`` (trained tasks), or ``error``."""
    from lobes.harmonifuse.predict import predict as predict_files

    return predict_files(model, decoding, paths, device, batch_seconds, num_beams)


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
    paths = find_audio_files(a.inputs)
    if not paths:
        print("no input audio files found", file=sys.stderr)
        return 2
    try:
        model, decoding = load_harmonifuse(a.model, a.device, a.lm_source, a.wavlm_source)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predict(model, decoding, paths, a.device, a.batch_seconds, a.num_beams)
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
