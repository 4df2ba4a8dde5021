"""Pseudo-label an unlabelled audio collection with a trained SER model: an SER manifest with soft labels.

    python -m tools.pseudo_label --model exp/adaltm/setup4_dual/1986 --out data/emilia_pseudo.json \
        --threshold 0.6 /data/Emilia/EN/ [more folders or files] [--device cuda] [--batch_seconds 120]

``--model``: a Hugging Face ``AutoModelForAudioClassification`` directory or hub id (``config.json`` with
``id2label`` + the feature extractor's ``preprocessor_config.json``, e.g. a fine-tuned WavLM / wav2vec 2.0 / HuBERT
emotion classifier; :class:`HFAudioLabeller`), or anything :func:`tools.infer.load_model` reads (an SER / AdaLTM /
MTL experiment folder of this toolkit, or a folded AdaLTM export). A labeller whose label names differ from the
recipe's classes takes ``--class_map ang=Anger,hap=Happiness,exc=Happiness,...`` with ``--classes`` (the recipe's
``emotion_classes``, their order): probabilities of labels mapped to one class add up, labels not in the map
(e.g. "other") are dropped, ``emo_soft`` is the mapped distribution renormalised, and ``confidence`` the top
mapped probability before renormalising (so an utterance the labeller calls "other" is not confident).

Inputs: audio files and folders (searched recursively for .wav/.flac/.ogg/.mp3). An
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
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from lobes.errors import DataError
from lobes.inference import SAMPLE_RATE, Recognizer, _min_samples
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


class HFAudioLabeller(Recognizer):
    """A transformers ``AutoModelForAudioClassification`` (+ its feature extractor) with the file-level surface of
    :class:`lobes.inference.Recognizer` (``predict``: decoding, 16 kHz mono, duration batches, failures per file).
    Classes are the model's ``id2label`` in id order. A feature extractor without an attention mask
    (``return_attention_mask: false``, e.g. wav2vec2-base) gets one file per forward, as HF advises for such
    models, so padding never changes a label."""

    def __init__(self, source, device="cpu"):
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(source)
            model = AutoModelForAudioClassification.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise DataError(f"{source}: not a transformers audio-classification model with a feature extractor "
                            f"({e})") from e
        self.modules = torch.nn.ModuleDict({"model": model})
        self.classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.description = f"{source} ({type(model).__name__})"
        self.device = torch.device(device)
        self.modules.to(self.device).eval()
        self.min_samples = _min_samples(model.config) if hasattr(model.config, "conv_kernel") else 1

    has_ser, has_ctc = True, False

    @torch.no_grad()
    def forward(self, wavs, wav_lens):
        n = torch.round(wav_lens * wavs.shape[1]).long().tolist()
        clips = [wavs[b, : n[b]].numpy() for b in range(len(n))]
        if not getattr(self.extractor, "return_attention_mask", False) and len(clips) > 1:
            return torch.cat([self.forward(wavs[b:b + 1, : n[b]], torch.ones(1))[0] for b in range(len(n))]), None
        feats = self.extractor(clips, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
        logits = self.modules["model"](**{k: v.to(self.device) for k, v in feats.items()}).logits
        return torch.softmax(logits.float(), dim=-1).cpu(), None


def load_labeller(model, device="cpu"):
    """An HF audio-classification model (a directory with config.json, or a hub id), else a toolkit model."""
    from tools.infer import load_model

    path = Path(model)
    hf_dir = (path / "config.json").is_file() and not (path / "downstream.json").is_file()  # not a folded export
    hub_id = not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) is not None
    return HFAudioLabeller(str(model), device) if hf_dir or hub_id else load_model(model, device)


def parse_class_map(text, classes):
    """``"ang=Anger,hap=Happiness"`` -> {labeller label: class}; every target must be one of ``classes``."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        label, sep, cls = item.partition("=")
        if not sep or cls.strip() not in classes:
            raise DataError(f"--class_map entry '{item}': expected label=Class with Class one of {classes}")
        out[label.strip()] = cls.strip()
    return out


def map_distribution(probs, class_map, classes):
    """Labeller probabilities {label: p} -> (soft labels over ``classes`` (renormalised), confidence = top mapped
    probability before renormalising, or None when no label is mapped)."""
    mass = [sum(p for label, p in probs.items() if class_map.get(label) == c) for c in classes]
    total = sum(mass)
    if total <= 0:
        return None, 0.0
    return [m / total for m in mass], max(mass)


def pseudo_label(recognizer, items, threshold, batch_seconds=60.0, class_map=None, classes=None):
    """-> (manifest dict, rejected [(file, reason)]). ``items`` from :func:`collect`; ``class_map`` /
    ``classes``: see the module doc (None: the labeller's own classes)."""
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"threshold must be a probability in [0, 1], got {threshold}")
    if not recognizer.has_ser:
        raise DataError(f"{recognizer.description}: the model has no emotion head; it cannot pseudo-label SER")
    if class_map:
        unknown = sorted(set(class_map) - set(recognizer.classes))
        if unknown:
            raise DataError(f"--class_map names labels {unknown} the labeller does not have ({recognizer.classes})")
    classes = list(classes) if class_map else recognizer.classes
    todo = [(p, m) for p, m, e in items if e is None]
    rejected = [(p, e) for p, _, e in items if e is not None]
    results = recognizer.predict([p for p, _ in todo], batch_seconds=batch_seconds) if todo else []
    manifest = {}
    for (path, meta), r in zip(todo, results):
        if r["error"]:
            rejected.append((path, r["error"]))
            continue
        if class_map:
            soft, conf = map_distribution(r["probs"], class_map, classes)
        else:
            soft = [float(r["probs"][c]) for c in classes]
            conf = max(soft)
        if conf < threshold:
            rejected.append((path, f"confidence {conf:.4f} below threshold {threshold}"))
            continue
        top = classes[max(range(len(classes)), key=soft.__getitem__)]
        meta = meta or {}
        utt = str(meta.get("id") or Path(path).stem)
        if utt in manifest:
            rejected.append((path, f"utterance id '{utt}' already used by {manifest[utt]['wav']}"))
            continue
        entry = {"wav": str(Path(path).resolve()), "duration": r["duration"], "emo": top,
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="manifest JSON to write (and <out>.rejected.tsv)")
    ap.add_argument("--threshold", type=float, required=True, help="keep files whose top probability is >= this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_seconds", type=float, default=60.0)
    ap.add_argument("--class_map", default="", help="labeller label=recipe class, comma-separated (needs --classes)")
    ap.add_argument("--classes", default="", help="the recipe's emotion_classes, comma-separated, in order")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        items = collect(a.inputs)
        if not items:
            raise DataError(f"no audio files found in {a.inputs}")
        classes = [c.strip() for c in a.classes.split(",") if c.strip()]
        if bool(a.class_map) != bool(classes):
            raise DataError("--class_map and --classes go together (the map's targets and their order)")
        class_map = parse_class_map(a.class_map, classes) if a.class_map else None
        manifest, rejected = pseudo_label(load_labeller(a.model, a.device), items, a.threshold, a.batch_seconds,
                                          class_map, classes)
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
