#!/usr/bin/env python3
"""Data preparation for MSP-Podcast (v1.11 / v1.12 layout): SpeechBrain JSON manifests for 8-class SER.

    python recipes/MSP-Podcast/msp_podcast_prepare.py --data_folder /corpora/MSP-Podcast --save_folder exp/msp \
        [--transcript_only] [--test_splits Test1 [Test2]] [--no_check_audio]

Reads ``Labels/labels_consensus.csv`` (split from ``Split_Set``: Train -> train, Development -> valid,
every ``Split_Set`` in ``test_splits`` -> test, e.g. ``[Test1]``, ``[Test2]`` or both; O and X dropped),
``Labels/labels_detailed.csv`` (soft labels = distribution of the annotators' primary votes over the 8 classes;
v1.11 ``EmoDetail`` and newer ``EmoClass_Major`` layouts)
and ``Transcripts/<stem>.txt`` (normalised for CTC by ``lobes.ctc_text.normalize_transcript``). Writes
``<save_folder>/{train,valid,test}.json``: ``{utt_id: {wav, duration, emo, emo_soft, spk_id, gender[, wrd]}}``.
A transcript that is empty after normalisation (only "[laughter]", only punctuation) gives no ``wrd``: with
``transcript_only`` the utterance is left out, otherwise it stays for SER without ``wrd``; either way it is
counted in the log and listed in ``<save_folder>/excluded_transcripts.txt`` (``id<TAB>reason``).
Transcripts are read as UTF-8; a line that is not is decoded as cp1252, counted in the log and listed in
``<save_folder>/cp1252_fallback.txt`` (``file<TAB>line``; ``lobes.text_io``). The label CSVs must be UTF-8
(``DataError`` naming the first line that is not).

Durations: with ``check_audio=True`` each file's header is read (sample rate, length; nothing decoded);
with ``check_audio=False`` they are estimated from the file size assuming 16 kHz 16-bit mono PCM with a
44-byte header (exact for the corpus' own wav files), so a 270k-row label file is prepared in seconds.
"""
import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

from lobes.audio import check_audio as check_audio_file
from lobes.ctc_text import normalize_transcript
from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.text_io import TextReader, not_utf8_error

SAMPLE_RATE = 16000
CONSENSUS_COLUMNS = ["FileName", "EmoClass", "SpkrID", "Gender", "Split_Set"]
OPTS_FILE = "msp_podcast_prepare.opts"  # JSON, but not *.json: only manifests match that
EXCLUDED_FILE = "excluded_transcripts.txt"  # utterances whose transcript normalises to nothing
WAV_HEADER_BYTES = 44
BYTES_PER_SECOND = SAMPLE_RATE * 2

# The 8-class MSP-Podcast inventory, alphabetical as the vox-profile SER checkpoint's head (minus its 'Other').
# Recipes declare their class list in YAML (``emotion_classes``) and pass it to ``prepare_msp_podcast``.
MSP_CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]

# labels_consensus.csv EmoClass letters. O (other) and X (no agreement) are not part of the 8-class task.
LETTER_TO_EMOTION = {
    "A": "Anger", "C": "Contempt", "D": "Disgust", "F": "Fear",
    "H": "Happiness", "N": "Neutral", "S": "Sadness", "U": "Surprise",
}
DROPPED_LETTERS = {"O", "X"}

# Primary-emotion words used by annotators in labels_detailed.csv (v1.11 EmoDetail and newer EmoClass_Major).
# Votes for 'Other...' are not one of the 8 classes and are ignored when building soft labels.
WORD_TO_EMOTION = {
    "angry": "Anger", "anger": "Anger",
    "contempt": "Contempt",
    "disgust": "Disgust", "disgusted": "Disgust",
    "fear": "Fear", "afraid": "Fear",
    "happy": "Happiness", "happiness": "Happiness",
    "neutral": "Neutral",
    "sad": "Sadness", "sadness": "Sadness",
    "surprise": "Surprise", "surprised": "Surprise",
}


# The AdaLTM paper's transcript subset of v1.12 (§3.1); which test split(s) it used is not stated. The prepare log
# prints each split's count beside these, so a run can be checked against the paper's data.
PAPER_COUNTS = {"train": 89752, "valid": 25232, "test": 46366}


def msp_manifests(hparams):
    """{train, valid, test} -> manifest paths written by ``prepare_msp_podcast`` into ``prep_folder``."""
    return {s: str(Path(hparams["prep_folder"]) / f"{s}.json") for s in ("train", "valid", "test")}


def _test_splits(test_splits):
    """``test_splits`` as a list of distinct ``Split_Set`` names (a single name is accepted as a string)."""
    names = [test_splits] if isinstance(test_splits, str) else list(test_splits or [])
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"test_splits: expected a non-empty list of Split_Set names (e.g. [Test1]), got {test_splits!r}")
    names = [n.strip() for n in names]
    clash = [n for n in names if n in ("Train", "Development")]
    if clash or len(set(names)) != len(names):
        raise DataError(f"test_splits {names}: Train / Development are not test data, and each split is listed once")
    return names


def _split_map(test_splits):
    return {"Train": "train", "Development": "valid", **{name: "test" for name in test_splits}}


def _stem(file_name):
    name = file_name.strip()
    return name[:-4] if name.lower().endswith(".wav") else name


def _vote_to_emotion(word):
    """Annotator's primary-emotion word -> class name, or None for Other-... and unknown words."""
    w = word.strip()
    if w in LETTER_TO_EMOTION:  # some releases store the letter code instead of the word
        return LETTER_TO_EMOTION[w]
    return WORD_TO_EMOTION.get(w.lower())


def read_detailed_votes(path, keep=None, classes=MSP_CLASSES):
    """Count the 8-class primary votes per utterance stem from ``labels_detailed.csv``.

    Supports v1.11 (``FileName,EmoDetail`` with ``"WORKER; Primary; Secondary,...; A:x; V:x; D:x;"``) and the
    newer layout with an ``EmoClass_Major`` column. Returns ``{stem: [one vote count per class]}`` in ``classes``
    order (votes for other classes are ignored); ``keep`` (a set of stems) limits the work to the utterances
    being prepared.
    """
    votes = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "FileName" not in header:
            raise DataError(f"{path}: no FileName column in header {header}")
        name_i = header.index("FileName")
        if "EmoClass_Major" in header:
            col, v111 = header.index("EmoClass_Major"), False
        elif "EmoDetail" in header:
            col, v111 = header.index("EmoDetail"), True
        else:
            raise DataError(f"{path}: neither an EmoDetail nor an EmoClass_Major column in header {header}")
        n_cols = max(name_i, col) + 1
        word_index = {}  # cache: primary word -> class index or None (millions of rows, few distinct words)
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < n_cols:
                raise DataError(f"{path}:{line_no}: expected {len(header)} columns, got {len(row)}")
            stem = row[name_i].strip()
            if stem[-4:].lower() == ".wav":
                stem = stem[:-4]
            if keep is not None and stem not in keep:
                continue
            field = row[col]
            if v111:
                parts = field.split(";", 2)
                if len(parts) < 2:
                    raise DataError(f"{path}:{line_no}: cannot parse EmoDetail {field!r} for {stem}")
                field = parts[1]
            if field not in word_index:
                emo = _vote_to_emotion(field)
                word_index[field] = classes.index(emo) if emo in classes else None
            idx = word_index[field]
            counts = votes.get(stem)
            if counts is None:
                counts = votes[stem] = [0] * len(classes)
            if idx is not None:
                counts[idx] += 1
    return votes


def soft_label(vote_counts, emo, classes=MSP_CLASSES):
    """Normalised vote distribution; one-hot of the consensus class when there are no usable votes."""
    total = sum(vote_counts) if vote_counts else 0
    if total == 0:
        soft = [0.0] * len(classes)
        soft[classes.index(emo)] = 1.0
        return soft
    return [c / total for c in vote_counts]


def write_manifest(manifest, f):
    """JSON with one utterance per line: readable, and ~10x faster than indent=2 (C encoder per entry)."""
    f.write("{\n")
    f.write(",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()))
    f.write("\n}\n")


def write_excluded(path, excluded):
    """``id<TAB>reason`` per utterance left out of the ASR subset (header line first; written even when empty,
    so that a stale list from an earlier run never survives)."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write("id\treason\n")
        f.writelines(f"{utt}\t{reason}\n" for utt, reason in excluded)


def _list_dir(folder, suffix):
    """{stem: DirEntry} of the files in ``folder`` ending in ``suffix`` (one scandir, no per-file stat)."""
    if not folder.is_dir():
        return {}
    with os.scandir(folder) as it:
        return {e.name[: -len(suffix)]: e for e in it if e.name.endswith(suffix)}


def _opts(data_folder, splits, transcript_only, test_splits, check_audio, classes):
    return {"data_folder": str(Path(data_folder).resolve()), "splits": list(splits),
            "transcript_only": bool(transcript_only), "test_splits": list(test_splits), "check_audio": bool(check_audio),
            "classes": list(classes)}


def _already_done(save_folder, splits, opts):
    opts_path = save_folder / OPTS_FILE
    if not opts_path.exists() or not all((save_folder / f"{s}.json").exists() for s in splits):
        return False
    try:
        return json.loads(opts_path.read_text()) == opts
    except (OSError, ValueError):
        return False


def _check_options(splits, classes, test_splits):
    """(classes as a list, test_splits as a list) after checking every option."""
    unknown = set(splits) - {"train", "valid", "test"}
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose among train, valid, test")
    classes = list(classes)
    foreign = [c for c in classes if c not in MSP_CLASSES]
    if foreign:
        raise DataError(f"emotion_classes {foreign} are not MSP-Podcast classes {MSP_CLASSES}")
    return classes, _test_splits(test_splits)


def read_consensus(labels_path, wanted, classes):
    """``[(split, stem, emotion, row)]`` of ``labels_consensus.csv``: the rows whose ``Split_Set`` is in
    ``wanted`` (``{Split_Set: split}``) and whose class is among ``classes`` (O / X dropped), validated,
    without touching audio."""
    rows = []
    try:
        with open(labels_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing_cols = [c for c in CONSENSUS_COLUMNS if c not in (reader.fieldnames or [])]
            if missing_cols:
                raise DataError(f"{labels_path}: missing column(s) {missing_cols}")
            for line_no, row in enumerate(reader, start=2):
                split = wanted.get(row["Split_Set"].strip())
                if split is None:
                    continue
                letter = row["EmoClass"].strip()
                if letter in DROPPED_LETTERS:
                    continue
                if letter not in LETTER_TO_EMOTION:
                    raise DataError(f"{labels_path}:{line_no}: unknown EmoClass {letter!r} for {row['FileName']}")
                if LETTER_TO_EMOTION[letter] in classes:
                    rows.append((split, _stem(row["FileName"]), LETTER_TO_EMOTION[letter], row))
    except UnicodeDecodeError:
        raise not_utf8_error(labels_path) from None
    return rows


def _votes(data_folder, rows, classes):
    """The detailed votes of the utterances in ``rows`` (``{}`` with a warning when the file is absent)."""
    detailed_path = data_folder / "Labels" / "labels_detailed.csv"
    if not detailed_path.is_file():
        print(f"Warning: {detailed_path} not found; emo_soft is the one-hot consensus class.")
        return {}
    try:
        return read_detailed_votes(detailed_path, {stem for _, stem, _, _ in rows}, classes)
    except UnicodeDecodeError:
        raise not_utf8_error(detailed_path) from None


def build_manifests(data_folder, rows, splits, classes, transcript_only, check_audio, reader):
    """``({split: manifest}, [(utt, reason)])`` from the consensus ``rows``: per-utterance checks (audio
    present and valid), soft labels and normalised transcripts (decoded by ``reader``); the second item lists
    the transcripts that normalise to nothing."""
    labels_path = data_folder / "Labels" / "labels_consensus.csv"
    audio_dir = data_folder / "Audios"
    audios = _list_dir(audio_dir, ".wav")
    transcripts = _list_dir(data_folder / "Transcripts", ".txt")
    votes = _votes(data_folder, rows, classes)
    manifests = {s: {} for s in splits}
    excluded = []
    for split, stem, emo, row in rows:
        entry = audios.get(stem)
        if entry is None:
            raise DataError(f"{labels_path}: audio file for {row['FileName']} not found in {audio_dir}")
        wrd = None
        if stem in transcripts:
            raw = reader.text(transcripts[stem].path)
            wrd = normalize_transcript(raw)
            if not wrd:  # e.g. only "[laughter]": out of the ASR subset, listed, never an abort
                excluded.append((stem, f"transcript empty after normalisation (raw: {raw.strip()[:80]!r})"))
        if transcript_only and not wrd:
            continue
        if check_audio:
            duration = check_audio_file(entry.path, SAMPLE_RATE)
        else:
            duration = max(0, entry.stat().st_size - WAV_HEADER_BYTES) / BYTES_PER_SECOND
        item = {"wav": entry.path, "duration": round(duration, 4), "emo": emo,
                "emo_soft": soft_label(votes.get(stem), emo, classes),
                "spk_id": row["SpkrID"].strip(), "gender": row["Gender"].strip()}
        if wrd:
            item["wrd"] = wrd
        if stem in manifests[split]:
            raise DataError(f"{labels_path}: {row['FileName']} listed twice")
        manifests[split][stem] = item
    return manifests, excluded


def _write_outputs(save_folder, paths, manifests, excluded, reader, opts):
    """Every output, atomically. The options file goes last (removed first), so a crash mid-way never looks
    'already done'."""
    (save_folder / OPTS_FILE).unlink(missing_ok=True)
    for split, manifest in manifests.items():
        with atomic_write(paths[split]) as f:
            write_manifest(manifest, f)
    write_excluded(save_folder / EXCLUDED_FILE, excluded)
    reader.write_report(save_folder)
    with atomic_write(save_folder / OPTS_FILE) as f:
        json.dump(opts, f, indent=2)


def _log_summary(save_folder, rows, manifests, excluded, transcript_only, test_splits, classes):
    if excluded:
        where = "left out of the manifests" if transcript_only else "kept without 'wrd' (not in the ASR subset)"
        print(f"{len(excluded)} utterance(s) whose transcript is empty after normalisation {where}; "
              f"listed in {save_folder / EXCLUDED_FILE}")
    split_set = {stem: row["Split_Set"].strip() for _, stem, _, row in rows}
    subset = " (utterances with a transcript only)" if transcript_only else ""
    print(f"MSP-Podcast manifests{subset} written to {save_folder} (test = {' + '.join(test_splits)}):")
    for split, manifest in manifests.items():
        per_class = Counter(item["emo"] for item in manifest.values())
        n_wrd = sum("wrd" in item for item in manifest.values())
        per_set = Counter(split_set[stem] for stem in manifest)
        sets = f" [{', '.join(f'{k} {per_set[k]}' for k in test_splits)}]" if split == "test" and len(test_splits) > 1 else ""
        print(f"  {split}: {len(manifest)} utterances{sets} ({n_wrd} with transcript; the paper's transcript subset "
              f"of v1.12: {PAPER_COUNTS[split]:,}); " + ", ".join(f"{e} {per_class.get(e, 0)}" for e in classes))


def prepare_msp_podcast(data_folder, save_folder, splits=("train", "valid", "test"), transcript_only=False,
                        test_splits=("Test1",), skip_prep=False, check_audio=True, classes=MSP_CLASSES):
    """Write ``<save_folder>/<split>.json`` for each of ``splits`` (names among train / valid / test).

    ``test_splits``: the ``Split_Set`` values that make up the test manifest (``["Test1"]``, ``["Test2"]`` or
    ``["Test1", "Test2"]``).

    ``classes``: the recipe's ``emotion_classes`` (a subset of ``MSP_CLASSES``, in the order of the soft labels);
    utterances whose consensus class is not among them are left out.

    Returns ``{split: manifest path}``. Skips the work when the manifests exist and were made with the same
    options. Raises ``DataError`` naming the file / row for bad input; nothing is written in that case.
    """
    save_folder = Path(save_folder)
    paths = {s: save_folder / f"{s}.json" for s in splits}
    if skip_prep:
        return paths
    classes, test_splits = _check_options(splits, classes, test_splits)
    opts = _opts(data_folder, splits, transcript_only, test_splits, check_audio, classes)
    if _already_done(save_folder, splits, opts):
        print(f"MSP-Podcast manifests in {save_folder} already prepared with the same options; skipping.")
        return paths

    data_folder = Path(data_folder).resolve()
    labels_path = data_folder / "Labels" / "labels_consensus.csv"
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: MSP-Podcast consensus labels not found (is data_folder right?)")
    wanted = {k: v for k, v in _split_map(test_splits).items() if v in splits}
    rows = read_consensus(labels_path, wanted, classes)  # pass 1: labels only
    reader = TextReader()
    manifests, excluded = build_manifests(data_folder, rows, splits, classes, transcript_only, check_audio, reader)
    _write_outputs(save_folder, paths, manifests, excluded, reader, opts)  # all checks passed
    _log_summary(save_folder, rows, manifests, excluded, transcript_only, test_splits, classes)
    return paths


def prepare_from_hparams(hparams, classes=MSP_CLASSES):
    """A recipe's stage 0: unless ``skip_prep``, prepare ``data_folder`` into ``prep_folder`` on the main
    process (``transcript_only``, ``test_splits`` from the YAML; ``classes`` = the recipe's
    ``emotion_classes``, all 8 for ASR). A rerun with the same options is skipped."""
    if hparams["skip_prep"]:
        return
    from speechbrain.utils.distributed import run_on_main

    run_on_main(prepare_msp_podcast, kwargs={
        "data_folder": hparams["data_folder"], "save_folder": hparams["prep_folder"],
        "transcript_only": hparams["transcript_only"], "test_splits": hparams["test_splits"], "classes": classes})


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare MSP-Podcast manifests for 8-class SER (and ASR subset).")
    p.add_argument("--data_folder", required=True, help="MSP-Podcast root (Audios/, Labels/, Transcripts/)")
    p.add_argument("--save_folder", required=True, help="where {train,valid,test}.json go")
    p.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    p.add_argument("--transcript_only", action="store_true", help="keep only utterances with a transcript")
    p.add_argument("--test_splits", nargs="+", default=["Test1"], help="Split_Set value(s) that form the test split")
    p.add_argument("--no_check_audio", action="store_true", help="skip header checks (durations from file size)")
    args = p.parse_args(argv)
    try:
        prepare_msp_podcast(args.data_folder, args.save_folder, splits=tuple(args.splits),
                            transcript_only=args.transcript_only, test_splits=args.test_splits,
                            check_audio=not args.no_check_audio)
    except DataError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
