#!/usr/bin/env python3
"""Data preparation for LibriSpeech: one SpeechBrain JSON manifest per split.

    python recipes/LibriSpeech/librispeech_prepare.py --data_folder /corpora/LibriSpeech --save_folder exp/libri \
        [--splits train-clean-100 dev-clean test-clean]

Layout: ``<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with ``<speaker>-<chapter>.trans.txt``
(``ID TRANSCRIPT`` lines). Writes ``<save_folder>/<split>.json``: ``{utt_id: {wav, duration, spk_id, wrd}}``
with ``wrd`` normalised by ``lobes.ctc_text.normalize_transcript`` and durations read from the flac headers.
An utterance whose transcript is empty after normalisation is left out, counted in the log and listed in
``<save_folder>/excluded_transcripts.txt`` (``id<TAB>reason``). A ``trans.txt`` line that is not UTF-8 is decoded as
cp1252, counted in the log and listed in ``<save_folder>/cp1252_fallback.txt`` (``file<TAB>line``; ``lobes.text_io``).
Splits absent on disk are skipped with a message, unless listed in ``required_splits``.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from lobes.audio import check_audio
from lobes.ctc_text import normalize_transcript
from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.text_io import TextReader

SAMPLE_RATE = 16000
DEFAULT_SPLITS = ("train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other")
OPTS_FILE = "librispeech_prepare.opts"  # JSON, but not *.json: only manifests match that
EXCLUDED_FILE = "excluded_transcripts.txt"  # utterances whose transcript normalises to nothing


def write_manifest(manifest, f):
    """JSON with one utterance per line (readable; fast C encoder per entry)."""
    f.write("{\n")
    f.write(",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()))
    f.write("\n}\n")


def _subdirs(folder):
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_dir())


def read_trans(path, reader):
    """``{utt_id: raw transcript}`` from one ``<spk>-<chapter>.trans.txt``, decoded by ``reader`` (a
    ``lobes.text_io.TextReader``)."""
    out = {}
    for line_no, line in reader.lines(path):
        line = line.strip()
        if not line:
            continue
        utt, _, text = line.partition(" ")
        if utt in out:
            raise DataError(f"{path}:{line_no}: utterance {utt} listed twice")
        out[utt] = text
    return out


def prepare_split(split_dir, reader, excluded=None):
    """Manifest dict of one split folder; every flac must be in its trans.txt and vice versa.

    An utterance whose transcript is empty after normalisation is left out and appended to ``excluded`` as
    ``(utt_id, reason)`` (never an abort). Transcripts are decoded by ``reader``.
    """
    manifest = {}
    excluded = [] if excluded is None else excluded
    for spk_dir in _subdirs(split_dir):
        spk = os.path.basename(spk_dir)
        for chap_dir in _subdirs(spk_dir):
            chap = os.path.basename(chap_dir)
            trans_path = os.path.join(chap_dir, f"{spk}-{chap}.trans.txt")
            with os.scandir(chap_dir) as it:
                flacs = {e.name[:-5]: e.path for e in it if e.name.endswith(".flac")}
            if not os.path.isfile(trans_path):
                if flacs:
                    raise DataError(f"{trans_path}: transcript file missing for {len(flacs)} flac file(s)")
                continue
            trans = read_trans(trans_path, reader)
            for utt in sorted(flacs):
                if utt not in trans:
                    raise DataError(f"{flacs[utt]}: utterance {utt} not found in {trans_path}")
            for utt in sorted(trans):
                if utt not in flacs:
                    raise DataError(f"{trans_path}: audio file {utt}.flac of utterance {utt} is missing")
                wrd = normalize_transcript(trans[utt])
                if not wrd:
                    excluded.append((utt, f"transcript empty after normalisation (raw: {trans[utt][:80]!r})"))
                    continue
                manifest[utt] = {
                    "wav": os.path.abspath(flacs[utt]),
                    "duration": round(check_audio(flacs[utt], SAMPLE_RATE), 4),
                    "spk_id": spk,
                    "wrd": wrd,
                }
    return manifest


def prepare_librispeech(data_folder, save_folder, splits=DEFAULT_SPLITS, skip_prep=False, required_splits=()):
    """Write ``<save_folder>/<split>.json`` for each split present under ``data_folder``.

    Returns ``{split: manifest path}`` for the splits written (or found already prepared). Raises
    ``DataError`` naming the file for bad input, and for a ``required_splits`` entry that is absent.
    """
    save_folder = Path(save_folder)
    data_folder = Path(data_folder).resolve()
    if skip_prep:
        return {s: save_folder / f"{s}.json" for s in splits}
    if not data_folder.is_dir():
        raise DataError(f"{data_folder}: LibriSpeech data_folder not found")
    for s in required_splits:
        if s not in splits:
            splits = tuple(splits) + (s,)
    present = []
    for s in splits:
        if (data_folder / s).is_dir():
            present.append(s)
        elif s in required_splits:
            raise DataError(f"{data_folder / s}: required LibriSpeech split {s} not found")
        else:
            print(f"LibriSpeech split {s} not found in {data_folder}; skipping it.")
    if not present:
        raise DataError(f"{data_folder}: none of the LibriSpeech splits {list(splits)} found")
    paths = {s: save_folder / f"{s}.json" for s in present}
    opts = {"data_folder": str(data_folder), "splits": present}
    opts_path = save_folder / OPTS_FILE
    if opts_path.exists() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(opts_path.read_text()) == opts:
                print(f"LibriSpeech manifests in {save_folder} already prepared; skipping.")
                return paths
        except (OSError, ValueError):
            pass

    excluded, reader = [], TextReader()
    manifests = {s: prepare_split(data_folder / s, reader, excluded) for s in present}  # all checks before any write
    opts_path.unlink(missing_ok=True)
    for s, manifest in manifests.items():
        with atomic_write(paths[s]) as f:
            write_manifest(manifest, f)
        hours = sum(item["duration"] for item in manifest.values()) / 3600
        n_spk = len({item["spk_id"] for item in manifest.values()})
        print(f"  {s}: {len(manifest)} utterances, {n_spk} speakers, {hours:.2f} h")
    with atomic_write(save_folder / EXCLUDED_FILE, encoding="utf-8") as f:  # written even when empty: no stale list
        f.write("id\treason\n")
        f.writelines(f"{utt}\t{reason}\n" for utt, reason in excluded)
    if excluded:
        print(f"  {len(excluded)} utterance(s) with a transcript empty after normalisation left out; "
              f"listed in {save_folder / EXCLUDED_FILE}")
    reader.write_report(save_folder)
    with atomic_write(opts_path) as f:
        json.dump(opts, f, indent=2)
    return paths


def librispeech_manifests(hparams):
    """``{train, valid, test}`` -> manifest paths in ``prep_folder`` of the YAML's ``train_split``,
    ``valid_split`` and ``test_split``."""
    folder = Path(hparams["prep_folder"])
    return {k: str(folder / f"{hparams[f'{k}_split']}.json") for k in ("train", "valid", "test")}


def prepare_from_hparams(hparams):
    """A recipe's stage 0: unless ``skip_prep``, prepare the YAML's ``train_split``, ``valid_split`` and
    ``test_split`` (all required; a rerun with the same options is skipped) on the main process."""
    if hparams["skip_prep"]:
        return
    from speechbrain.utils.distributed import run_on_main

    splits = tuple(hparams[f"{k}_split"] for k in ("train", "valid", "test"))
    run_on_main(prepare_librispeech, kwargs={"data_folder": hparams["data_folder"],
                                             "save_folder": hparams["prep_folder"], "splits": splits,
                                             "required_splits": splits})


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare LibriSpeech manifests (SpeechBrain JSON).")
    p.add_argument("--data_folder", required=True, help="LibriSpeech root holding the split folders")
    p.add_argument("--save_folder", required=True)
    p.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS))
    p.add_argument("--required_splits", nargs="*", default=[], help="splits that must exist")
    args = p.parse_args(argv)
    try:
        prepare_librispeech(args.data_folder, args.save_folder, tuple(args.splits),
                            required_splits=tuple(args.required_splits))
    except DataError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
