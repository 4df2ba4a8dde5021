"""Pseudo-label an unlabelled audio collection with a trained SER model: an SER manifest with soft labels.

    python -m tools.pseudo_label --model exp/adaltm/setup4_dual/1986 --out data/emilia_pseudo.json \
        --threshold 0.6 /data/Emilia/EN/ [more folders or files] [--device cuda] [--batch_seconds 120]

``--model``: anything :func:`tools.infer.load_model` reads (an SER / AdaLTM / MTL experiment folder, or a
folded AdaLTM export). Inputs: audio files and folders (searched recursively for .wav/.flac/.ogg/.mp3). An
Emilia-style layout (audio + a per-utterance JSON with the same stem, e.g. ``X.mp3`` + ``X.json`` holding
``id``, ``speaker``, ``text``) is read as well: ``id`` names the utterance, ``speaker`` becomes ``spk_id`` and
``text`` becomes ``wrd``; without a JSON the file's stem is the id and the speaker is ``unknown``.

Every file is classified; a file is kept when the model's top probability is at least ``--threshold``. The
manifest (``{utt_id: {wav, duration, emo, emo_soft, spk_id[, wrd], confidence}}``, the format of
``msp_podcast_prepare``; ``emo`` = argmax class, ``emo_soft`` = the model's full class distribution, in the
model's class order) is what the SER / MTL recipes and :func:`lobes.dataio.ser_datasets` read. Files that are
left out (below the threshold, unreadable, or with a bad JSON) are listed with the reason in
``<out>.rejected.tsv`` and counted; one bad file never stops the run. Writes are atomic.
"""
import argparse
import csv
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from lobes.errors import DataError
from lobes.io_utils import atomic_write

logger = logging.getLogger(__name__)


def collect(inputs):
    """[(audio path, metadata dict or None, error or None)] for the audio files named by ``inputs``."""
    from lobes.inference import find_audio_files

    out = []
    for path in find_audio_files(inputs):
        side = Path(path).with_suffix(".json")
        meta, err = None, None
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                meta, err = None, f"{side}: unreadable utterance JSON ({e})"
        out.append((path, meta, err))
    return out


def pseudo_label(recognizer, items, threshold, batch_seconds=60.0):
    """-> (manifest dict, rejected [(file, reason)]). ``items`` from :func:`collect`."""
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"threshold must be a probability in [0, 1], got {threshold}")
    if not recognizer.has_ser:
        raise DataError(f"{recognizer.description}: the model has no emotion head; it cannot pseudo-label SER")
    classes = recognizer.classes
    todo = [(p, m) for p, m, e in items if e is None]
    rejected = [(p, e) for p, _, e in items if e is not None]
    results = recognizer.predict([p for p, _ in todo], batch_seconds=batch_seconds) if todo else []
    manifest = {}
    for (path, meta), r in zip(todo, results):
        if r["error"]:
            rejected.append((path, r["error"]))
            continue
        soft = [float(r["probs"][c]) for c in classes]
        conf = max(soft)
        if conf < threshold:
            rejected.append((path, f"confidence {conf:.4f} below threshold {threshold}"))
            continue
        meta = meta or {}
        utt = str(meta.get("id") or Path(path).stem)
        if utt in manifest:
            rejected.append((path, f"utterance id '{utt}' already used by {manifest[utt]['wav']}"))
            continue
        entry = {"wav": str(Path(path).resolve()), "duration": r["duration"], "emo": classes[soft.index(conf)],
                 "emo_soft": soft, "spk_id": str(meta.get("speaker") or "unknown"), "confidence": conf}
        if isinstance(meta.get("text"), str):
            entry["wrd"] = meta["text"]
        manifest[utt] = entry
    return manifest, rejected


def write_outputs(out, manifest, rejected):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        json.dump(manifest, f, indent=2)
    rej = out.with_name(out.stem + ".rejected.tsv")
    with atomic_write(rej, newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["file", "reason"])
        w.writerows(rejected)
    return rej


def main(argv=None):
    from tools.infer import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="manifest JSON to write (and <out>.rejected.tsv)")
    ap.add_argument("--threshold", type=float, required=True, help="keep files whose top probability is >= this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_seconds", type=float, default=60.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        items = collect(a.inputs)
        if not items:
            raise DataError(f"no audio files found in {a.inputs}")
        manifest, rejected = pseudo_label(load_model(a.model, a.device), items, a.threshold, a.batch_seconds)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rej = write_outputs(a.out, manifest, rejected)
    counts = Counter(e["emo"] for e in manifest.values())
    print(f"kept {len(manifest)} of {len(items)} files ({dict(sorted(counts.items()))}); "
          f"left out {len(rejected)} (listed in {rej})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
