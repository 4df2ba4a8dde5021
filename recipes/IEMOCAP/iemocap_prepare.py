#!/usr/bin/env python3
"""Data preparation for IEMOCAP (``IEMOCAP_full_release`` layout): SER (and ASR) manifests per fold.

    python recipes/IEMOCAP/iemocap_prepare.py --data_folder /corpora/IEMOCAP_full_release --save_folder exp/iemocap \
        [--split_protocol sessions|speakers|random] [--folds 1 2 3 4 5] [--valid_gender F] \
        [--split_seed 12] [--split_ratio 80 10 10] [--class_map '{"neu": "neu", "hap": "hap", "exc": "hap", ...}']

Reads, for each ``Session{1..5}``:

- ``dialog/EmoEvaluation/<dialog>.txt``: per utterance a consensus line
  ``[start - end]<TAB><utt>\t<cat>\t[V, A, D]`` followed by per-evaluator category lines
  ``C-E2:\tNeutral;\t()``, ``C-F1:\tAnger; Frustration;\t(comment)`` ... (``A-`` attribute lines are ignored);
- ``dialog/transcriptions/<dialog>.txt``: ``<utt> [start-end]: text`` lines;
- ``sentences/wav/<dialog>/<utt>.wav`` (16 kHz mono; the header is read for the duration).

Labels. ``class_map`` maps IEMOCAP category codes to class names; codes not in the map are dropped (``fru``,
``sur``, ``xxx``, ...). The default is the standard 4-class setup with excitement merged into happiness
(``neu``, ``hap`` + ``exc``, ``ang``, ``sad``): 5,531 utterances on the full corpus, as SpeechBrain's prepare
counts (neu 1,708, hap 1,636, ang 1,103, sad 1,084). The class order (= label index) is the order in which
the names first appear among the map's values; it is written to ``<save_folder>/classes.txt``.

Soft labels (``emo_soft``) come from the evaluator lines (every ``C-`` line, external ``C-E#`` and the
actors' ``C-F#`` / ``C-M#`` alike): each evaluator's vote has weight 1, split equally over the categories
on the line; categories are mapped with ``class_map`` (so an "Excited" vote is a ``hap`` vote) and those
outside the map are ignored (as MSP-Podcast's "Other" votes are); the result is normalised. An utterance
without a usable vote gets the one-hot of its consensus class.

Folds (``split_protocol``). Speaker ids are ``Ses01_F`` ... ``Ses05_M`` (the speaker is the letter of the
utterance's last name part, ``..._F000``; the ``F``/``M`` in the dialog name only says who wore the
motion-capture markers).

- ``sessions`` (default; leave one session out, folds 1-5): fold ``k``: test = Session ``k`` (both speakers);
  validation = the speaker of gender ``valid_gender`` of the next session (Session ``k % 5 + 1``), so validation
  is speaker-independent of both test and training; training = the other 7 speakers.
- ``speakers`` (leave one speaker out, folds 1-10, SpeechBrain's ``different_speakers: True`` with
  ``test_spk_id``): speakers are numbered as SpeechBrain does, Session ``s``'s F speaker = ``2s - 1`` and its M
  speaker = ``2s``; fold ``k``: test = speaker ``k``, validation = the other speaker of the same session,
  training = the other 8 speakers.
- ``random`` (one fold, SpeechBrain's default ``split_ratio: [80, 10, 10]``): the utterances, sorted by id, are
  shuffled with ``random.Random(split_seed)``; the first ``int(n * 80 / 100)`` train, the next
  ``int(n * 10 / 100)`` validate, the rest test (SpeechBrain's arithmetic). The SER utterances and the ASR-only
  ones (other categories) are split separately, in this order, with the same generator. Speakers are shared
  across splits (not speaker-independent).

``<save_folder>/folds.tsv`` lists every fold: ``fold, split, speakers, ser_utterances, asr_utterances``.

Writes ``<save_folder>/fold{k}/{train,valid,test}.json`` in the MSP-Podcast schema,
``{utt_id: {wav, duration, emo, emo_soft, spk_id, gender[, wrd]}}`` (plus ``session``, ``emo_orig`` = the
IEMOCAP code, ``vad``), so the same dataio reads them, and ``<save_folder>/classes.txt``. With
``asr_manifests`` also ``fold{k}/asr_{train,valid,test}.json``: every evaluated utterance of the split's
speakers (any category) with a transcript, for the in-domain ASR vector. Transcripts go through
``lobes.ctc_text.normalize_transcript`` (IEMOCAP marks ``[LAUGHTER]``, ``[BREATHING]``, ``[GARBAGE]``); one
that is missing or empty after normalisation gives no ``wrd`` and is listed in
``<save_folder>/excluded_transcripts.txt`` (``id<TAB>reason``). Text files are read as UTF-8; a line that is
not UTF-8 is decoded as cp1252 (``caf\\xe9`` -> ``café``), counted in the log and listed in
``<save_folder>/cp1252_fallback.txt`` (``file<TAB>line``; ``lobes.text_io``). Bad input (an unparsable
consensus line, an unknown category code, a missing or corrupt wav) raises ``DataError`` naming the file and
line; nothing is written then.
"""
import argparse
import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

from lobes.audio import check_audio
from lobes.ctc_text import normalize_transcript
from lobes.errors import DataError
from lobes.io_utils import atomic_write
from lobes.text_io import TextReader

SAMPLE_RATE = 16000
N_SESSIONS = 5
SPLITS = ("train", "valid", "test")
# split_protocol -> its folds (sessions: test session; speakers: SpeechBrain's test_spk_id; random: one split)
PROTOCOL_FOLDS = {"sessions": tuple(range(1, N_SESSIONS + 1)), "speakers": tuple(range(1, 2 * N_SESSIONS + 1)),
                  "random": (1,)}
FOLDS_FILE = "folds.tsv"
OPTS_FILE = "iemocap_prepare.opts"  # JSON, but not *.json: only manifests match that
CLASSES_FILE = "classes.txt"
EXCLUDED_FILE = "excluded_transcripts.txt"
FULL_CORPUS_4CLASS = 5531  # utterances of the default map on the full corpus (SpeechBrain's NUMBER_UTT)

# The standard 4-class setup: excitement merged into happiness.
DEFAULT_CLASS_MAP = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
# Consensus codes of EmoEvaluation files ('xxx': no agreement, 'oth': other).
CATEGORY_CODES = ("neu", "hap", "exc", "ang", "sad", "fru", "sur", "fea", "dis", "oth", "xxx")
# Category words of the evaluator lines -> codes.
EVALUATOR_WORDS = {
    "neutral": "neu", "neutral state": "neu", "happiness": "hap", "happy": "hap", "excited": "exc",
    "anger": "ang", "angry": "ang", "sadness": "sad", "sad": "sad", "frustration": "fru", "frustrated": "fru",
    "surprise": "sur", "surprised": "sur", "fear": "fea", "fearful": "fea", "disgust": "dis", "disgusted": "dis",
    "other": "oth",
}
_NUM = r"\d+(?:\.\d*)?"
_CONSENSUS = re.compile(rf"^\[\s*({_NUM})\s*-\s*({_NUM})\s*\]\s+(\S+)\s+(\S+)\s+\[\s*({_NUM})\s*,\s*({_NUM})\s*,"
                        rf"\s*({_NUM})\s*\]\s*$")
_EVALUATOR = re.compile(r"^C-([A-Za-z]+\d*):\s*(.*?)\s*(\(.*\))?\s*$")
_TRANSCRIPT = re.compile(r"^(Ses\S+)\s+\[[^\]]*\]:\s?(.*)$")


# ------------------------------------------------------------------------------------------------ parsing
def read_emo_evaluation(path, reader, unknown_words=None):
    """``[{utt, code, vad, votes, line}]`` from one ``EmoEvaluation/<dialog>.txt``, decoded by ``reader`` (a
    ``lobes.text_io.TextReader``: UTF-8, listed cp1252 fallback).

    ``votes``: one list of category codes per ``C-`` evaluator line (``[["neu"], ["ang", "fru"], ...]``);
    an unknown evaluator word counts as ``oth`` (ignored by the soft labels) and is counted in
    ``unknown_words`` (a Counter) when given.
    """
    out = []
    for line_no, raw in reader.lines(path):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if line.startswith("["):
            m = _CONSENSUS.match(line)
            if m is None:
                raise DataError(f"{path}:{line_no}: cannot parse consensus line {line!r} "
                                "(expected '[start - end]<TAB>utt<TAB>cat<TAB>[V, A, D]')")
            code = m.group(4).lower()
            if code not in CATEGORY_CODES:
                raise DataError(f"{path}:{line_no}: unknown category {m.group(4)!r} for {m.group(3)} "
                                f"(expected one of {list(CATEGORY_CODES)})")
            out.append({"utt": m.group(3), "code": code, "vad": [float(m.group(i)) for i in (5, 6, 7)],
                        "votes": [], "line": line_no})
        elif line.startswith("C-") and out:
            m = _EVALUATOR.match(line)
            if m is None:
                raise DataError(f"{path}:{line_no}: cannot parse evaluator line {line!r}")
            words = [w.strip().lower() for w in m.group(2).split(";") if w.strip()]
            if unknown_words is not None:
                unknown_words.update(w for w in words if w not in EVALUATOR_WORDS)
            out[-1]["votes"].append([EVALUATOR_WORDS.get(w, "oth") for w in words])
    return out


def read_transcriptions(path, reader):
    """``{utt: raw text}`` from one ``transcriptions/<dialog>.txt`` decoded by ``reader`` (lines that are not
    ``<utt> [..]: text`` are skipped)."""
    out = {}
    for _, line in reader.lines(path):
        m = _TRANSCRIPT.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def soft_label(votes, code, class_map, classes):
    """Evaluator votes -> distribution over ``classes`` (see the module docstring); one-hot of the consensus
    class when no vote maps to a class."""
    index = {c: i for i, c in enumerate(classes)}
    counts = [0.0] * len(classes)
    for categories in votes:
        for cat in categories:
            if cat in class_map:
                counts[index[class_map[cat]]] += 1.0 / len(categories)
    total = sum(counts)
    if total == 0:
        counts[index[class_map[code]]] = 1.0
        return counts
    return [c / total for c in counts]


def classes_of(class_map):
    """Class names in label-index order: first appearance among the map's values."""
    return list(dict.fromkeys(class_map.values()))


def speaker_of(utt, session):
    """``Ses0k_F`` / ``Ses0k_M`` from the utterance id's last part (``Ses01F_script01_1_M012`` -> ``Ses01_M``)."""
    gender = utt.rsplit("_", 1)[-1][:1].upper()
    if gender not in ("F", "M"):
        raise ValueError(gender)
    return f"Ses{session:02d}_{gender}", gender


def fold_speakers(test_session, valid_gender):
    """(valid speaker, test speakers) of the fold whose test set is ``test_session``."""
    valid_session = test_session % N_SESSIONS + 1
    return f"Ses{valid_session:02d}_{valid_gender}", {f"Ses{test_session:02d}_F", f"Ses{test_session:02d}_M"}


def speaker_of_number(k):
    """SpeechBrain's speaker number (1..10) -> speaker id: Session s's F = 2s - 1, its M = 2s."""
    return f"Ses{(k + 1) // 2:02d}_{'F' if k % 2 else 'M'}"


def speaker_fold(test_spk):
    """(valid speaker, {test speaker}) of leave-one-speaker-out fold ``test_spk``: valid = the other speaker of
    the test speaker's session (SpeechBrain's split_different_speakers)."""
    other = test_spk + 1 if test_spk % 2 else test_spk - 1
    return speaker_of_number(other), {speaker_of_number(test_spk)}


def random_splits(entries, seed, ratio):
    """``{utt: split}`` of the ``random`` protocol (module docstring): SER utterances, then ASR-only ones."""
    rng, out = random.Random(seed), {}
    for group in (sorted(u for u, e in entries.items() if "emo" in e),
                  sorted(u for u, e in entries.items() if "emo" not in e)):
        rng.shuffle(group)
        n_train = int(len(group) * ratio[0] / sum(ratio))
        n_valid = int(len(group) * ratio[1] / sum(ratio))
        out.update({u: "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
                    for i, u in enumerate(group)})
    return out


def split_assigner(protocol, fold, valid_gender, entries, seed, ratio):
    """A function ``(utt, entry) -> split`` for one fold of ``protocol``."""
    if protocol == "random":
        splits = random_splits(entries, seed, ratio)
        return lambda utt, item: splits[utt]
    valid_spk, test_spks = fold_speakers(fold, valid_gender) if protocol == "sessions" else speaker_fold(fold)
    return lambda utt, item: ("test" if item["spk_id"] in test_spks else
                              "valid" if item["spk_id"] == valid_spk else "train")


# ------------------------------------------------------------------------------------------------ prepare
def _check_class_map(class_map):
    if not isinstance(class_map, dict) or not class_map:
        raise DataError(f"class_map must be a non-empty dict of IEMOCAP codes -> class names, got {class_map!r}")
    unknown = [k for k in class_map if k not in CATEGORY_CODES]
    if unknown:
        raise DataError(f"class_map: unknown IEMOCAP code(s) {unknown} (codes: {list(CATEGORY_CODES)})")
    bad = [v for v in class_map.values() if not isinstance(v, str) or not v]
    if bad:
        raise DataError(f"class_map: class names must be non-empty strings, got {bad}")
    return dict(class_map)


def _sorted_txt(folder):
    """The ``*.txt`` files of ``folder`` (no subfolders, no ``._`` resource-fork files), sorted."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and e.name.endswith(".txt")
                      and not e.name.startswith("."))


def read_corpus(data_folder, reader, unknown_words=None):
    """Every evaluated utterance: ``[{utt, session, dialog, code, vad, votes, spk_id, gender, wav, text}]``
    (``text`` None when the dialog's transcription has no line for it); text files are decoded by ``reader``."""
    utts, seen = [], {}
    for session in range(1, N_SESSIONS + 1):
        sdir = data_folder / f"Session{session}"
        emo_dir = sdir / "dialog" / "EmoEvaluation"
        emo_files = _sorted_txt(emo_dir)
        if not emo_files:
            raise DataError(f"{emo_dir}: no EmoEvaluation/*.txt files (is data_folder the IEMOCAP_full_release "
                            "folder?)")
        for emo_path in emo_files:
            dialog = emo_path.stem
            trans_path = sdir / "dialog" / "transcriptions" / f"{dialog}.txt"
            texts = read_transcriptions(trans_path, reader) if trans_path.is_file() else {}
            for u in read_emo_evaluation(emo_path, reader, unknown_words):
                utt = u["utt"]
                where = f"{emo_path}:{u['line']}"
                if not utt.startswith(f"Ses{session:02d}"):
                    raise DataError(f"{where}: utterance {utt} does not belong to Session{session}")
                if utt in seen:
                    raise DataError(f"{where}: utterance {utt} already listed at {seen[utt]}")
                seen[utt] = where
                try:
                    spk, gender = speaker_of(utt, session)
                except ValueError:
                    raise DataError(f"{where}: cannot tell the speaker of {utt} (name must end in _F### or _M###)") from None
                wav_dialog = utt.rsplit("_", 1)[0]
                u.update(session=session, dialog=dialog, spk_id=spk, gender=gender, where=where,
                         wav=sdir / "sentences" / "wav" / wav_dialog / f"{utt}.wav", text=texts.get(utt))
                utts.append(u)
    return utts


def write_manifest(manifest, f):
    """JSON with one utterance per line (same format as the MSP-Podcast manifests)."""
    f.write("{\n")
    f.write(",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()))
    f.write("\n}\n")


def _opts(data_folder, class_map, folds, valid_gender, asr_manifests, split):
    opts = {"data_folder": str(Path(data_folder).resolve()), "class_map": class_map, "folds": list(folds),
            "valid_gender": valid_gender, "asr_manifests": bool(asr_manifests), "split_protocol": split["protocol"]}
    if split["protocol"] == "random":  # seed and ratio change nothing else
        opts.update(split_seed=split["seed"], split_ratio=list(split["ratio"]))
    return opts


def _outputs(save_folder, folds, asr_manifests):
    names = SPLITS + (tuple(f"asr_{s}" for s in SPLITS) if asr_manifests else ())
    return {k: {s: save_folder / f"fold{k}" / f"{s}.json" for s in names} for k in folds}


def _check_split(protocol, seed, ratio):
    """``{protocol, seed, ratio}`` after checking them; DataError naming the bad one."""
    if protocol not in PROTOCOL_FOLDS:
        raise DataError(f"split_protocol must be one of {list(PROTOCOL_FOLDS)}, got {protocol!r}")
    ratio = tuple(ratio)
    if len(ratio) != 3 or not all(isinstance(r, (int, float)) and r >= 0 for r in ratio) or not sum(ratio) > 0:
        raise DataError(f"split_ratio must be 3 non-negative numbers (train, valid, test), got {list(ratio)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"split_seed must be an integer, got {seed!r}")
    return {"protocol": protocol, "seed": seed, "ratio": ratio}


def _check_options(class_map, folds, valid_gender, split):
    """(class map, folds as ints) after checking every option; DataError naming the bad one."""
    class_map = _check_class_map(DEFAULT_CLASS_MAP if class_map is None else class_map)
    allowed = PROTOCOL_FOLDS[split["protocol"]]
    folds = allowed if folds is None else tuple(int(k) for k in folds)
    if not folds or any(k not in allowed for k in folds):
        raise DataError(f"folds of split_protocol '{split['protocol']}' are {list(allowed)}, got {list(folds)}")
    if valid_gender not in ("F", "M"):
        raise DataError(f"valid_gender must be 'F' or 'M', got {valid_gender!r}")
    return class_map, folds


def _already_done(save_folder, paths, opts):
    """True when every manifest exists and the options file records the same options."""
    opts_path = save_folder / OPTS_FILE
    if not opts_path.exists() or not all(p.exists() for f in paths.values() for p in f.values()):
        return False
    try:
        return json.loads(opts_path.read_text(encoding="utf-8")) == opts
    except (OSError, ValueError):
        return False


def build_entries(utts, class_map, classes, asr_manifests):
    """``({utt: manifest entry}, [(utt, reason)])``: the entries of the SER utterances (and, with
    ``asr_manifests``, of every other evaluated one), checking each wav; the excluded-transcript list."""
    entries, excluded = {}, []
    for u in utts:
        keep_ser = u["code"] in class_map
        if not keep_ser and not asr_manifests:
            continue
        if not u["wav"].is_file():
            raise DataError(f"{u['where']}: audio file {u['wav']} of {u['utt']} not found")
        item = {"wav": str(u["wav"]), "duration": round(check_audio(u["wav"], SAMPLE_RATE), 4)}
        if keep_ser:
            emo = class_map[u["code"]]
            item.update(emo=emo, emo_soft=soft_label(u["votes"], u["code"], class_map, classes))
        item.update(spk_id=u["spk_id"], gender={"F": "Female", "M": "Male"}[u["gender"]], session=u["session"],
                    emo_orig=u["code"], vad=u["vad"])
        if u["text"] is None:
            excluded.append((u["utt"], "no transcript line in transcriptions/" + u["dialog"] + ".txt"))
        else:
            wrd = normalize_transcript(u["text"])
            if wrd:
                item["wrd"] = wrd
            else:
                excluded.append((u["utt"], f"transcript empty after normalisation (raw: {u['text'].strip()[:80]!r})"))
        entries[u["utt"]] = item
    return entries, excluded


def fold_manifests(entries, split_of, names):
    """``{name: manifest}`` of one fold, for each manifest ``name`` (``train`` ... and ``asr_train`` ...);
    ``split_of(utt, entry)`` gives the fold's split of an utterance (``split_assigner``)."""
    out = {name: {} for name in names}
    asr = "asr_train" in out
    for utt, item in entries.items():
        split = split_of(utt, item)
        if "emo" in item:
            out[split][utt] = item
        if asr and "wrd" in item:
            out[f"asr_{split}"][utt] = {key: v for key, v in item.items() if key not in ("emo", "emo_soft")}
    return out


def write_fold_list(f, manifests):
    """``folds.tsv``: per fold and split, its speakers and SER / ASR utterance counts."""
    f.write("fold\tsplit\tspeakers\tser_utterances\tasr_utterances\n")
    for k, out in manifests.items():
        for s in SPLITS:
            ser, asr = out[s], out.get(f"asr_{s}", {})
            speakers = sorted({e["spk_id"] for e in (*ser.values(), *asr.values())})
            f.write(f"{k}\t{s}\t{' '.join(speakers)}\t{len(ser)}\t{len(asr) if f'asr_{s}' in out else ''}\n")


def _write_outputs(save_folder, paths, manifests, classes, excluded, reader, opts):
    """Every output file, each atomically; the options file last, so a crash mid-way never looks 'already
    done' (it is removed first)."""
    opts_path = save_folder / OPTS_FILE
    opts_path.unlink(missing_ok=True)
    with atomic_write(save_folder / CLASSES_FILE, encoding="utf-8") as f:
        f.write("".join(c + "\n" for c in classes))
    with atomic_write(save_folder / EXCLUDED_FILE, encoding="utf-8") as f:
        f.write("id\treason\n")
        f.writelines(f"{utt}\t{reason}\n" for utt, reason in excluded)
    reader.write_report(save_folder)
    with atomic_write(save_folder / FOLDS_FILE, encoding="utf-8") as f:
        write_fold_list(f, manifests)
    for k, out in manifests.items():
        for name, manifest in out.items():
            with atomic_write(paths[k][name], encoding="utf-8") as f:
                write_manifest(manifest, f)
    with atomic_write(opts_path, encoding="utf-8") as f:
        json.dump(opts, f, indent=2)


def prepare_iemocap(data_folder, save_folder, class_map=None, folds=None, valid_gender="F",
                    asr_manifests=True, skip_prep=False, split_protocol="sessions", split_seed=12,
                    split_ratio=(80, 10, 10)):
    """Write the manifests of every fold of ``split_protocol`` (see the module docstring).

    Arguments
    ---------
    data_folder : str or Path
        The ``IEMOCAP_full_release`` folder (holding ``Session1`` ... ``Session5``).
    save_folder : str or Path
        Where ``classes.txt``, ``excluded_transcripts.txt``, ``cp1252_fallback.txt`` and ``fold{k}/*.json`` go.
    class_map : dict or None
        IEMOCAP category code -> class name (YAML-passable); None = ``DEFAULT_CLASS_MAP`` (4 classes).
    folds : sequence of int or None
        Folds to write (``sessions``: test sessions 1..5; ``speakers``: test speakers 1..10; ``random``: 1);
        None = all of the protocol's.
    valid_gender : str
        ``"F"`` or ``"M"``: with ``sessions``, the validation speaker of fold k is this speaker of Session
        ``k % 5 + 1``.
    asr_manifests : bool
        Also write ``fold{k}/asr_{split}.json`` (all evaluated utterances with a transcript).
    skip_prep : bool
        Return the paths without doing anything.
    split_protocol : str
        ``"sessions"`` (leave one session out), ``"speakers"`` (leave one speaker out) or ``"random"``.
    split_seed : int
        Seed of the ``random`` protocol's shuffle (SpeechBrain's prepare uses 12).
    split_ratio : sequence of 3 numbers
        Train / valid / test proportions of the ``random`` protocol.

    Returns
    -------
    dict
        ``{fold: {split: manifest path}}``; ``<save_folder>/classes.txt`` lists the classes.
    """
    save_folder = Path(save_folder)
    split = _check_split(split_protocol, split_seed, split_ratio)
    class_map, folds = _check_options(class_map, folds, valid_gender, split)
    paths = _outputs(save_folder, folds, asr_manifests)
    if skip_prep:
        return paths
    data_folder = Path(data_folder).resolve()
    if not data_folder.is_dir():
        raise DataError(f"{data_folder}: IEMOCAP data_folder not found")
    opts = _opts(data_folder, class_map, folds, valid_gender, asr_manifests, split)
    if _already_done(save_folder, paths, opts):
        print(f"IEMOCAP manifests in {save_folder} already prepared with the same options; skipping.")
        return paths
    classes = classes_of(class_map)

    # All parsing and checks first; nothing is written before they pass.
    reader, unknown_words = TextReader(), Counter()
    utts = read_corpus(data_folder, reader, unknown_words)
    entries, excluded = build_entries(utts, class_map, classes, asr_manifests)
    manifests = {k: fold_manifests(entries, split_assigner(split["protocol"], k, valid_gender, entries, split["seed"],
                                                           split["ratio"]), paths[k]) for k in folds}
    _write_outputs(save_folder, paths, manifests, classes, excluded, reader, opts)
    _log_counts(entries, classes, manifests, excluded, class_map, save_folder, split["protocol"])
    if unknown_words:
        print(f"  evaluator category words not recognised (ignored, like 'Other'): {dict(unknown_words)}")
    return paths


def count_per_session(entries, classes):
    """``{session: {class: n}}`` of the SER utterances (those whose code is in the class map)."""
    counts = {s: Counter() for s in range(1, N_SESSIONS + 1)}
    for item in entries.values():
        if "emo" in item:
            counts[item["session"]][item["emo"]] += 1
    return {s: {c: c_counts.get(c, 0) for c in classes} for s, c_counts in counts.items()}


def describe_fold(protocol, k):
    """What fold ``k`` of ``protocol`` tests on, for the log."""
    return {"sessions": f"test Session{k}", "speakers": f"test speaker {k} = {speaker_of_number(k)}",
            "random": "random split"}[protocol]


def _log_counts(entries, classes, manifests, excluded, class_map, save_folder, protocol):
    per_session = count_per_session(entries, classes)
    total = sum(sum(c.values()) for c in per_session.values())
    note = f" (full corpus: {FULL_CORPUS_4CLASS})" if class_map == DEFAULT_CLASS_MAP else ""
    print(f"IEMOCAP: {total} utterances in classes {classes}{note}; manifests in {save_folder}")
    width = max(len(c) for c in classes) + 1
    print("  session " + "".join(f"{c:>{max(width, 6)}}" for c in classes) + "   total")
    for s, c in per_session.items():
        print(f"  {s:>7} " + "".join(f"{c[k]:>{max(width, 6)}}" for k in classes) + f"{sum(c.values()):>8}")
    all_c = {k: sum(c[k] for c in per_session.values()) for k in classes}
    print("  all     " + "".join(f"{all_c[k]:>{max(width, 6)}}" for k in classes) + f"{total:>8}")
    for k, out in manifests.items():
        sizes = ", ".join(f"{name} {len(m)}" for name, m in out.items())
        print(f"  fold{k} ({describe_fold(protocol, k)}): {sizes}")
    if excluded:
        print(f"  {len(excluded)} utterance(s) without a usable transcript (no 'wrd', not in the ASR manifests); "
              f"listed in {save_folder / EXCLUDED_FILE}")


def iemocap_manifests(hparams, asr=False):
    """``{train, valid, test}`` -> manifest paths of fold ``hparams["fold"]`` of ``hparams["split_protocol"]``
    in ``hparams["prep_folder"]`` (``asr=True``: the ``asr_*`` manifests, every evaluated utterance with a
    transcript). DataError when the fold is not one of the protocol's, or the folder was prepared with
    another protocol (its ``fold{k}`` would silently be another split)."""
    protocol, fold = hparams["split_protocol"], int(hparams["fold"])
    if fold not in PROTOCOL_FOLDS.get(protocol, ()):
        raise DataError(f"fold {fold} is not a fold of split_protocol {protocol!r} "
                        f"(folds: {list(PROTOCOL_FOLDS.get(protocol, ()))}; protocols: {list(PROTOCOL_FOLDS)})")
    opts_path = Path(hparams["prep_folder"]) / OPTS_FILE
    if opts_path.is_file():
        prepared = json.loads(opts_path.read_text(encoding="utf-8")).get("split_protocol", "sessions")
        if prepared != protocol:
            raise DataError(f"{opts_path}: prepared with split_protocol {prepared!r}, the recipe asks for "
                            f"{protocol!r}: prepare again (skip_prep: False) or use another prep_folder")
    folder = Path(hparams["prep_folder"]) / f"fold{fold}"
    return {s: str(folder / f"{'asr_' if asr else ''}{s}.json") for s in SPLITS}


def annotation_manifests(hparams):
    """SpeechBrain-style ``train_annotation`` / ``valid_annotation`` / ``test_annotation`` (e.g. the manifests of
    SpeechBrain's own IEMOCAP prepare: ``wav``, ``length``, ``emo``): ``{split: path}``, or None when all three
    are null (then the prepared fold is used). DataError when only some are set."""
    given = {s: hparams[f"{s}_annotation"] for s in SPLITS}
    if all(v is None for v in given.values()):
        return None
    missing = [f"{s}_annotation" for s, v in given.items() if v is None]
    if missing:
        raise DataError(f"{missing} not set: give all three annotation manifests, or none (prepared folds)")
    return {s: str(v) for s, v in given.items()}


def prepare_from_hparams(hparams, classes=None):
    """A recipe's stage 0: prepare every fold (once; a rerun with the same options is skipped) unless
    ``skip_prep``, then check that ``classes`` (an SER recipe's ``emotion_classes``; None for ASR) are the
    prepared ``classes.txt``, in order. ``class_map`` and ``valid_gender`` come from the YAML (ASR recipes
    declare them too: the manifests are shared, and the folds' validation speaker depends on them).

    All folds of the protocol are always written so that the options, hence the skip check, are the same for
    every fold's run. Raises DataError naming the file when the classes differ (a label set must not silently change).
    """
    if not hparams["skip_prep"]:
        from speechbrain.utils.distributed import run_on_main

        run_on_main(prepare_iemocap, kwargs={
            "data_folder": hparams["data_folder"], "save_folder": hparams["prep_folder"],
            "class_map": dict(hparams["class_map"]), "valid_gender": hparams["valid_gender"],
            "split_protocol": hparams["split_protocol"], "split_seed": hparams["split_seed"],
            "split_ratio": list(hparams["split_ratio"])})
    if classes is not None:
        check_classes(hparams["prep_folder"], classes)


def check_classes(save_folder, classes):
    """DataError unless ``<save_folder>/classes.txt`` lists exactly ``classes`` (same names, same order)."""
    path = Path(save_folder) / CLASSES_FILE
    try:
        prepared = path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        raise DataError(f"{path} not found: run data preparation (skip_prep: False) first") from None
    if prepared != list(classes):
        raise DataError(f"{path} lists classes {prepared} but emotion_classes is {list(classes)}: prepare with the "
                        "recipe's class_map, or make emotion_classes its classes in order of first appearance")
    return prepared


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare IEMOCAP SER (and ASR) manifests, one folder per fold.")
    p.add_argument("--data_folder", required=True, help="the IEMOCAP_full_release folder")
    p.add_argument("--save_folder", required=True, help="where classes.txt, folds.tsv and fold{k}/*.json go")
    p.add_argument("--split_protocol", default="sessions", choices=list(PROTOCOL_FOLDS),
                   help="sessions: leave one session out (5 folds); speakers: leave one speaker out (10 folds); "
                        "random: one 80/10/10 split")
    p.add_argument("--folds", nargs="+", type=int, default=None, help="folds to write (default: all)")
    p.add_argument("--valid_gender", default="F", choices=["F", "M"],
                   help="sessions protocol: validation speaker of fold k is this speaker of Session k %% 5 + 1")
    p.add_argument("--split_seed", type=int, default=12, help="random protocol: shuffle seed")
    p.add_argument("--split_ratio", nargs=3, type=float, default=[80, 10, 10], help="random protocol: proportions")
    p.add_argument("--class_map", default=None, help="JSON dict IEMOCAP code -> class (default: 4 classes)")
    p.add_argument("--no_asr_manifests", action="store_true", help="skip fold{k}/asr_*.json")
    args = p.parse_args(argv)
    try:
        class_map = None if args.class_map is None else json.loads(args.class_map)
    except ValueError as e:
        sys.exit(f"Error: --class_map is not valid JSON ({e})")
    try:
        prepare_iemocap(args.data_folder, args.save_folder, class_map=class_map, folds=args.folds,
                        valid_gender=args.valid_gender, asr_manifests=not args.no_asr_manifests,
                        split_protocol=args.split_protocol, split_seed=args.split_seed,
                        split_ratio=args.split_ratio)
    except DataError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
