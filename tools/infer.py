"""Predict emotions (and transcripts, for models with a CTC head) for audio files and folders.

    python -m tools.infer --model exp/adaltm/setup4_dual/1986 wav1.wav folder/ ...
    python -m tools.infer --model exp/adaltm/setup4_dual/1986/folded_wavlm --device cuda \
        --csv out.csv --json out.json clips/

``--model``: an experiment directory of the SER / ASR-CTC / AdaLTM / MTL recipes (best checkpoint + its
hyperparams.yaml) or a folded AdaLTM export (``folded_wavlm/``); :func:`load_model` does the same in Python.
Folders are searched recursively for .wav/.flac/.ogg/.mp3. Any sample rate and channel count is accepted
(downmixed and resampled to 16 kHz). Prints a table; ``--csv`` / ``--json`` write every file's result (one
probability per class of the model included).

Exit code: 0 when every file was predicted, 1 when any file failed (listed on stderr, the rest still predicted),
2 for bad arguments, a bad model directory or no input files.
"""
import argparse
import csv
import io
import json
import logging
import sys
import warnings
from pathlib import Path

from lobes.errors import DataError
from lobes.io_utils import atomic_write


def load_model(path, device="cpu", overrides=None, fold=False):
    """A :class:`lobes.inference.Recognizer` from an experiment folder or a folded AdaLTM export.

    Experiments go through the one shared loader (``lobes.inference.load_experiment``); the tools layer is where
    the paper packages meet it: a folded export is read by ``lobes.adaltm.fold_export``, and ``fold`` bakes an
    AdaLTM experiment's λ into one plain WavLM once (faster; otherwise W_base + Σ λ ΔW is rebuilt at every batch,
    exactly as in training). ``overrides``: see ``load_experiment``.
    """
    from lobes.adaltm import fold_export
    from lobes.adaltm.merged_wavlm import MergedWavLM
    from lobes.inference import load_experiment, recognizer_from_experiment

    path = Path(path)
    if fold_export.is_folded_export(path):
        return fold_export.load_folded_export(path, device)
    if path.is_dir() and not (path / "hyperparams.yaml").is_file() and not any(path.glob("*/hyperparams.yaml")):
        raise DataError(f"{path}: neither an experiment directory (hyperparams.yaml + save/) nor a folded export "
                        "(config.json + downstream.json)")
    exp = load_experiment(path, overrides)
    encoder = exp.modules["wavlm"]
    if fold and isinstance(encoder, MergedWavLM):
        encoder = fold_export.folded_encoder(encoder)
    return recognizer_from_experiment(exp, device, encoder)


def _short(text, width):
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(results, file_width=48, text_width=60):
    """Plain-text table: file, emotion, its probability, transcript (when present), status."""
    has_text = any("transcript" in r for r in results)
    head = f"{'file':<{file_width}}  {'emotion':<10} {'prob':>6}" + (f"  {'transcript':<{text_width}}" if has_text
                                                                     else "") + "  status"
    lines = [head, "-" * len(head)]
    for r in results:
        emo = r.get("emotion") or "-"
        prob = f"{r['probs'][r['emotion']]:.3f}" if r.get("emotion") else "-"
        line = f"{_short(r['file'], file_width):<{file_width}}  {emo:<10} {prob:>6}"
        if has_text:
            line += f"  {_short(r.get('transcript') or '', text_width):<{text_width}}"
        line += "  " + ("FAILED" if r.get("error") else "ok")
        lines.append(line)
    return "\n".join(lines)


def csv_text(results, classes):
    """One row per file: file, status, emotion, one probability column per class, transcript (if any), error."""
    has_text = any("transcript" in r for r in results)
    cols = ["file", "status", "emotion"] + list(classes) + (["transcript"] if has_text else []) + \
        ["duration", "sample_rate", "channels", "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in results:
        probs = r.get("probs") or {}
        row = [r["file"], "failed" if r.get("error") else "ok", r.get("emotion") or ""]
        row += [f"{probs[c]:.6f}" if c in probs else "" for c in classes]
        if has_text:
            row.append(r.get("transcript") or "")
        row += ["" if r.get(k) is None else r[k] for k in ("duration", "sample_rate", "channels", "error")]
        w.writerow(row)
    return buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="experiment directory or folded export directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--csv", help="write results as CSV to this file")
    p.add_argument("--json", help="write results as JSON to this file")
    p.add_argument("--batch-seconds", type=float, default=60.0,
                   help="padded audio seconds per batch (default 60; lower it if memory runs out)")
    p.add_argument("--fold", action="store_true", help="AdaLTM experiment: bake λ into the weights once (faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no table on screen")
    p.add_argument("inputs", nargs="+", help="audio files and/or folders (searched recursively)")
    a = p.parse_args(argv)
    if a.batch_seconds <= 0:
        p.error("--batch-seconds must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torch's notice about HF WavLM's mask types, once per batch: noise for a user of this tool
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
    for handler in logging.getLogger().handlers:  # rebuilding hparams logs seeds and optional-package notices
        handler.addFilter(lambda r: r.levelno >= logging.ERROR
                          or not r.name.startswith(("speechbrain", "transformers")))

    import torch

    from lobes.inference import find_audio_files

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {a.device} requested but CUDA is not available", file=sys.stderr)
        return 2
    files = find_audio_files(a.inputs)
    if not files:
        print(f"error: no audio files (.wav/.flac/.ogg/.mp3) in {' '.join(a.inputs)}", file=sys.stderr)
        return 2
    try:
        model = load_model(a.model, device=a.device, fold=a.fold)
    except (DataError, OSError) as e:
        print(f"error: cannot load model: {e}", file=sys.stderr)
        return 2
    results = model.predict(files, batch_seconds=a.batch_seconds, progress=not a.no_progress)
    if not a.quiet:
        print(format_table(results))
    if a.csv:
        with atomic_write(a.csv) as f:
            f.write(csv_text(results, model.classes if model.has_ser else []))
    if a.json:
        with atomic_write(a.json) as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
            f.write("\n")
    failed = [r for r in results if r.get("error")]
    print(f"{len(results) - len(failed)} of {len(results)} files predicted", file=sys.stderr)
    for r in failed:
        msg = r["error"] if r["error"].startswith(r["file"]) else f"{r['file']}: {r['error']}"
        print(f"FAILED {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
