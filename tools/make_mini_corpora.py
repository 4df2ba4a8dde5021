"""Generate tiny synthetic MSP-Podcast (v1.12 layout) and LibriSpeech corpora with espeak-ng + sox.

    python -m tools.make_mini_corpora --msp_out data/mini_msp --libri_out data/mini_libri [--seed 1234]
        [--n_msp 240 --msp_test_factor 1 --n_libri 60 --n_libri_eval 16]

Everything is a pure function of the seed and the sizes: the same arguments give byte-identical label files and
audio. Speakers are espeak-ng voices with different variants. Each corpus is built in a hidden sibling folder and
renamed into place, so a failed run leaves nothing half-written; an existing output folder is only replaced if it
was made by this tool.

Emotion in words and in prosody (mini MSP-Podcast)
--------------------------------------------------
Each utterance's sentence comes from its class's bank, the union of sentence pools in tools/sentences.txt
(6 sentences per pool, 2 in "common"), and is spoken with its class's prosody pattern: espeak-ng pitch (0-99),
speed (words/min), amplitude (0-200) and word gap (10 ms), then a sox pitch shift (cents) that widens the F0 range
beyond espeak-ng's. Each utterance jitters pitch ±4, speed ±6 %, amplitude ±8 %. The recipes normalise every
waveform to unit variance, so amplitude is no cue for the models: the patterns differ in rate, F0 and pauses.

    class        bank (pools)       pattern  pitch speed amp gap shift
    A Anger      blame + common     hot      70    240   170  0   +200   high, fastest, loud
    H Happiness  news + common      hot      70    240   170  0   +200
    C Contempt   blame + common     cold     25    135   130  2   -300   low, slow, short pauses
    D Disgust    disgust + common   cold     25    135   130  2   -300
    F Fear       fear + common      tense    99    150   60   0   +700   highest, slow-ish, quiet
    U Surprise   news + common      tense    99    150   60   0   +700
    N Neutral    plain + common     flat     40    180   100  0   0      mid everything
    S Sadness    plain + common     low      10    100   50   5   -300   low, slowest, quiet, long pauses

Which cue separates which pair:
- prosody-ambiguous, separated by the words: A-H, C-D, F-U (same pattern; disjoint pools apart from "common");
- word-ambiguous, separated by the prosody: A-C, H-U, N-S (identical banks; different patterns);
- every other pair (22 of 28) differs in both.
Any two banks share at least the two "common" sentences (a pair of classes with different pools shares exactly
those two), so a quarter of each class's utterances carry no word cue at all. A prosody-only classifier at best
merges the three prosody-ambiguous pairs and a words-only one the three word-ambiguous pairs; only both cues
together separate all eight classes, which is what lets an in-domain ASR task vector help SER. O and X rows
(dropped by the recipe's preparation) draw from every pool with their own patterns.
Measured with seed 1234 (tests/test_mini_corpora.py: 5-fold CV balanced accuracy over the 240 labelled
utterances; bag-of-words on the transcripts, rate / F0 / pauses measured on the unit-variance audio):
    8 classes:                  words 0.43   prosody 0.60   both 0.85   (chance 0.125)
    pairs A-H, C-D, F-U:        words 0.82 0.82 0.75         prosody 0.60 0.42 0.67   (chance 0.5)
    pairs A-C, H-U, N-S:        words 0.45 0.35 0.52         prosody 1.00 0.92 1.00

Train, test and sentences
-------------------------
Test utterances are never training utterances: each row is one file with its own id, speaker draw and prosody
jitter. Test *sentences* do occur in training, by design: the banks are closed and the Train rows of each class
cycle through its bank (transcribed rows first), so with the default sizes every sentence of a class's bank is in
the transcribed Train split, and the CTC model is tested on sentences it heard in other renderings (119
transcribed Train utterances over 32 sentences, about four each; 111 word types). Mini LibriSpeech likewise: its
own neutral pool "libri" (16 sentences, 73 word types, none shared with MSP), train-clean-100 cycling through it
(60 utterances by 8 speakers, about four per sentence), dev/test drawn from it, but spoken by 4 + 4 speakers
disjoint from train's as in LibriSpeech (their accents all occur in train). mini_counts.json of each corpus
records the overlap ("sentences": test utterances whose sentence is
in training, test words not in training).
"""
import argparse
import csv
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lobes.ctc_text import normalize_transcript
from lobes.errors import DataError
from lobes.io_utils import atomic_dir
from tools.sentence_banks import CLASS_POOLS, LIBRI, POOLS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "MSP-Podcast"))
from msp_podcast_prepare import LETTER_TO_EMOTION, MSP_CLASSES as EMOTIONS  # noqa: E402

README_NAME = "README_generated.txt"
COUNTS_NAME = "mini_counts.json"
META_NAME = "generation_meta.csv"  # per-utterance pool, sentence, voice and prosody (not part of the layout)

CONSENSUS_COLUMNS = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
DETAILED_COLUMNS = ["FileName", "EmoDetail"]
SPLIT_TO_MANIFEST = {"Train": "train", "Development": "valid", "Test1": "test"}

# (SpkrID, Gender, espeak-ng voice+variant). Speakers are shared by all splits so a tiny model sees them all.
MSP_SPEAKERS = [
    ("11", "Male", "en-us+m3"),
    ("12", "Female", "en-gb+f2"),
    ("23", "Male", "en-gb-x-rp+m1"),
    ("34", "Female", "en-029+f4"),
    ("45", "Male", "en-gb-scotland+m7"),
    ("56", "Female", "en-us+f3"),
]
# Rows whose speaker is 'Unknown' in the consensus file are spoken by this voice.
UNKNOWN_SPEAKER_VOICE = "en-us-nyc+m2"
UNKNOWN_SPEAKER_RATE = 0.05

# One speaker (2 chapters) per voice; splits are speaker-disjoint as in LibriSpeech. Training has twice as many
# voices as dev/test, covering every accent that dev/test use, so that CTC can generalise to unseen speakers.
LIBRI_VOICES = {
    "train-clean-100": ["en-us+m1", "en-gb+f1", "en-gb-x-rp+m4", "en-us+f5", "en-029+m5", "en-gb-scotland+f2",
                        "en-us-nyc+m6", "en-gb-x-gbclan+f4"],
    "dev-clean": ["en-gb-x-rp+f2", "en-us-nyc+m7", "en-gb-scotland+m3", "en-029+f5"],
    "test-clean": ["en-us+m8", "en-gb+f3", "en-029+m2", "en-us+f1"],
}

# Prosody patterns: espeak-ng pitch (0-99), speed (words/min), amplitude (0-200), word gap (x10 ms), and a sox
# pitch shift (cents) that widens the F0 range beyond espeak-ng's. The models normalise each waveform to unit
# variance, so amplitude is no cue for them: every pair the design separates by prosody differs in rate and F0.
PATTERNS = {
    "hot": (70, 240, 170, 0, 200),     # high, fastest, loud
    "tense": (99, 150, 60, 0, 700),    # highest, slow-ish, quiet
    "flat": (40, 180, 100, 0, 0),      # mid everything
    "cold": (25, 135, 130, 2, -300),   # low, slow, firm, short pauses
    "low": (10, 100, 50, 5, -300),     # lowest, slowest, quiet, long pauses
    "other": (45, 180, 110, 0, 0),
    "mixed": (55, 175, 105, 1, 0),
}
# Consensus letter -> prosody pattern (the design table is in the module docstring).
CLASS_PATTERN = {"A": "hot", "H": "hot", "C": "cold", "D": "cold", "F": "tense", "U": "tense",
                 "N": "flat", "S": "low", "O": "other", "X": "mixed"}
# Mean (arousal, valence, dominance) on the 1-7 scale per consensus letter.
ATTRIBUTES = {
    "A": (6.0, 2.0, 5.5), "C": (3.5, 2.8, 4.5), "D": (4.5, 2.2, 4.8), "F": (5.5, 2.5, 2.8),
    "H": (5.5, 6.0, 4.8), "N": (3.8, 4.0, 4.0), "S": (2.5, 2.2, 2.8), "U": (5.8, 4.8, 4.2),
    "O": (4.0, 4.0, 4.0), "X": (4.2, 3.8, 4.0),
}
# Primary-emotion words as annotators wrote them in labels_detailed.csv (v1.11).
LETTER_TO_WORD = {"A": "Angry", "C": "Contempt", "D": "Disgust", "F": "Fear", "H": "Happy",
                  "N": "Neutral", "S": "Sad", "U": "Surprise"}
OTHER_WORDS = ["Other-Frustrated", "Other-Concerned", "Other-Confused", "Other-Amused"]
SECONDARY_WORDS = ["Frustrated", "Annoyed", "Concerned", "Amused", "Confused", "Disappointed", "Excited",
                   "Depressed", "Bored", "Neutral"]
N_VOTES = 5
LABELLED = "ACDFHNSU"


def _pooled_bank(letter):
    """The sentences one consensus letter draws from, each with its pool: [(pool, sentence)]."""
    return [(pool, s) for pool in CLASS_POOLS[letter] for s in POOLS[pool]]


def _libri_text(sentence):
    """LibriSpeech transcripts are upper case with apostrophes and no punctuation."""
    text = re.sub(r"[^A-Z' ]", " ", sentence.upper())
    return " ".join(text.split())


def _check_tools():
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"make_mini_corpora needs '{tool}' on PATH (Debian packages espeak-ng, sox)")


def _synthesize(job):
    """One utterance: espeak-ng at 22.05 kHz -> sox -> 16 kHz mono 16-bit wav/flac at job['out']."""
    out = Path(job["out"])
    raw = Path(job["tmpdir"]) / f"{job['index']}.wav"
    cmd = ["espeak-ng", "-v", job["voice"], "-p", str(job["pitch"]), "-s", str(job["speed"]),
           "-a", str(job["amp"]), "-g", str(job["gap"]), "-w", str(raw), job["text"]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # -R (repeatable) and -D (no dither) keep sox output a pure function of its input.
    shift = ["pitch", str(job["shift"])] if job["shift"] else []
    cmd = ["sox", "-R", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(out),
           *shift, "pad", "0.05", "0.05"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw.unlink()


def _run_jobs(jobs, workers):
    with tempfile.TemporaryDirectory(prefix="mini_corpora_") as tmpdir:
        for i, job in enumerate(jobs):
            job["index"], job["tmpdir"] = i, tmpdir
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_synthesize, jobs))


def _prosody(rng, pattern):
    pitch, speed, amp, gap, shift = PATTERNS[pattern]
    return {
        "pitch": min(99, max(0, pitch + rng.randint(-4, 4))),
        "speed": int(round(speed * rng.uniform(0.94, 1.06))),
        "amp": int(round(amp * rng.uniform(0.92, 1.08))),
        "gap": gap,
        "shift": shift,
    }


def _votes(rng, letter):
    """Five primary-emotion words; for the 8 classes a strict majority agrees with the consensus letter."""
    if letter in LABELLED:
        n_major = rng.choice([3, 3, 4, 4, 5])
        others = [w for ltr, w in LETTER_TO_WORD.items() if ltr != letter] + OTHER_WORDS
        votes = [LETTER_TO_WORD[letter]] * n_major + [rng.choice(others) for _ in range(N_VOTES - n_major)]
    elif letter == "O":
        votes = [rng.choice(OTHER_WORDS) for _ in range(3)] + [LETTER_TO_WORD[rng.choice(LABELLED)] for _ in range(2)]
    else:  # X: no agreement, two classes tie
        a, b = rng.sample(LABELLED, 2)
        votes = [LETTER_TO_WORD[a]] * 2 + [LETTER_TO_WORD[b]] * 2 + [rng.choice(OTHER_WORDS)]
    rng.shuffle(votes)
    return votes


def _fmt_attr(x):
    return f"{min(7.0, max(1.0, x)):.1f}"


def _split_sizes(n):
    n_train, n_dev = round(0.6 * n), round(0.2 * n)
    return {"Train": n_train, "Development": n_dev, "Test1": n - n_train - n_dev}


def _cycle(rng, bank, n):
    """n draws that go through ``bank`` in a fresh random order each round: every item recurs n // len(bank) or
    one more times (the balanced repetition a tiny CTC model needs)."""
    out = []
    while len(out) < n:
        order = list(bank)
        rng.shuffle(order)
        out += order
    return out[:n]


def _msp_specs(rng, n_msp, test_factor):
    """(EmoClass letter, Split_Set) of every row, shuffled: each labelled class in every split, plus "O"/"X" rows
    and Test2 rows (no public labels)."""
    per_class = max(1, n_msp // len(LABELLED))
    n_extra = max(1, n_msp // 30)
    specs = []
    for letter in LABELLED:
        for split, k in _split_sizes(per_class).items():
            specs += [(letter, split)] * (k * test_factor if split == "Test1" else k)
    specs += [("O", "Train")] * n_extra
    specs += [("X", rng.choice(["Train", "Development", "Test1"])) for _ in range(n_extra)]
    specs += [(rng.choice(LABELLED), "Test2") for _ in range(n_extra)]
    rng.shuffle(specs)
    return specs


def _msp_row(rng, letter, split, seg_counter):
    """One labels_consensus.csv row (speaker, attributes, prosody, votes), sorted later by its file name."""
    if rng.random() < UNKNOWN_SPEAKER_RATE:
        spk, gender, voice, podcast = "Unknown", "Unknown", UNKNOWN_SPEAKER_VOICE, 99
    else:
        k = rng.randrange(len(MSP_SPEAKERS))
        (spk, gender, voice), podcast = MSP_SPEAKERS[k], k + 1
    seg_counter[podcast] += 1
    act, val, dom = (m + rng.uniform(-0.6, 0.6) for m in ATTRIBUTES[letter])
    return {
        "FileName": f"MSP-PODCAST_{podcast:04d}_{seg_counter[podcast]:04d}.wav",
        "EmoClass": letter, "EmoAct": _fmt_attr(act), "EmoVal": _fmt_attr(val), "EmoDom": _fmt_attr(dom),
        "SpkrID": spk, "Gender": gender, "Split_Set": split,
        "_voice": voice, "_prosody": _prosody(rng, CLASS_PATTERN[letter]),
        "_votes": _votes(rng, letter), "_attrs": (act, val, dom),
    }


def _assign_sentences(rng, rows):
    """Each row's sentence and transcript text. Each class's Train rows cycle through its bank, transcribed rows
    first, so that every bank sentence is in the CTC training data once a class has as many transcribed Train rows
    as bank sentences. The other splits draw from the same bank (test sentences also occur in training; see the
    docstring)."""
    for letter in sorted({r["EmoClass"] for r in rows}):
        bank = _pooled_bank(letter)
        train = sorted((r for r in rows if r["EmoClass"] == letter and r["Split_Set"] == "Train"),
                       key=lambda r: not r["_has_transcript"])
        for r, (pool, sentence) in zip(train, _cycle(rng, bank, len(train))):
            r["_pool"], r["_sentence"] = pool, sentence
        for r in rows:
            if r["EmoClass"] == letter and r["Split_Set"] != "Train":
                r["_pool"], r["_sentence"] = rng.choice(bank)
    for r in rows:
        # Transcript files vary case and spacing so that normalisation is exercised.
        text = r["_sentence"]
        style = rng.random()
        if style < 0.2:
            text = text.lower()
        elif style < 0.35:
            text = "  " + text.replace(" ", "  ") + " "
        r["_transcript"] = text


def _plan_msp(rng, n_msp, test_factor=1):
    """All rows of labels_consensus.csv with their prosody, votes and transcript (no I/O)."""
    seg_counter = Counter()
    rows = [_msp_row(rng, letter, split, seg_counter) for letter, split in _msp_specs(rng, n_msp, test_factor)]
    rows.sort(key=lambda r: r["FileName"])
    # ~15% of utterances have no transcript file; a couple of labelled files have no detailed votes.
    no_transcript = set(rng.sample(range(len(rows)), round(0.15 * len(rows))))
    labelled_idx = [i for i, r in enumerate(rows) if r["EmoClass"] in LABELLED and r["Split_Set"] != "Test2"]
    no_detail = set(rng.sample(labelled_idx, max(1, n_msp // 120)))
    for i, r in enumerate(rows):
        r["_has_transcript"] = i not in no_transcript
        r["_has_detail"] = i not in no_detail
    _assign_sentences(rng, rows)
    return rows


def _msp_counts(rows, seed, n_msp):
    raw = {}
    for r in rows:
        raw.setdefault(r["Split_Set"], Counter())[r["EmoClass"]] += 1

    def manifest_counts(keep):
        out = {}
        for split, name in SPLIT_TO_MANIFEST.items():
            sel = [r for r in rows if r["Split_Set"] == split and r["EmoClass"] in LABELLED and keep(r)]
            per_class = Counter(LETTER_TO_EMOTION[r["EmoClass"]] for r in sel)
            out[name] = {"total": len(sel), "per_class": {e: per_class.get(e, 0) for e in EMOTIONS}}
        return out

    return {
        "seed": seed,
        "n_msp": n_msp,
        "rows": len(rows),
        "split_set_letters": {s: dict(sorted(c.items())) for s, c in sorted(raw.items())},
        "dropped": {"O": sum(r["EmoClass"] == "O" for r in rows), "X": sum(r["EmoClass"] == "X" for r in rows)},
        "test2": sum(r["Split_Set"] == "Test2" for r in rows),
        "unknown_speaker": sum(r["SpkrID"] == "Unknown" for r in rows),
        "without_transcript": sorted(r["FileName"][:-4] for r in rows if not r["_has_transcript"]),
        "without_detailed_votes": sorted(r["FileName"][:-4] for r in rows if not r["_has_detail"]),
        "manifest": manifest_counts(lambda r: True),
        "manifest_transcript_only": manifest_counts(lambda r: r["_has_transcript"]),
        # What the CTC recipe trains and tests on: labelled, transcribed Train and Test1 rows.
        "sentences": _sentence_overlap(
            [r["_sentence"] for r in rows if r["EmoClass"] in LABELLED and r["_has_transcript"]
             and r["Split_Set"] == "Train"],
            [r["_sentence"] for r in rows if r["EmoClass"] in LABELLED and r["_has_transcript"]
             and r["Split_Set"] == "Test1"]),
    }


def _sentence_overlap(train, test):
    """How much of the test text the training text already contains (recorded in mini_counts.json)."""
    seen = set(train)

    def words(sentences):
        return {w for s in sentences for w in normalize_transcript(s).split()}

    return {
        "train_utterances": len(train), "train_distinct": len(seen), "train_vocabulary": len(words(train)),
        "test_utterances": len(test), "test_distinct": len(set(test)),
        "test_utterances_with_sentence_in_train": sum(s in seen for s in test),
        "test_words_not_in_train": sorted(words(test) - words(train)),
    }


def _write_msp(stage, rows, counts, workers, rng):
    (stage / "Audios").mkdir()
    (stage / "Labels").mkdir()
    (stage / "Transcripts").mkdir()
    with open(stage / "Labels" / "labels_consensus.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CONSENSUS_COLUMNS)
        for r in rows:
            w.writerow([r[c] for c in CONSENSUS_COLUMNS])
    workers_pool = [f"WORKER{k:05d}" for k in range(1, 41)]
    with open(stage / "Labels" / "labels_detailed.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(DETAILED_COLUMNS)
        for r in rows:
            if not r["_has_detail"]:
                continue
            for worker, word in zip(rng.sample(workers_pool, N_VOTES), r["_votes"]):
                secondary = ",".join(rng.sample(SECONDARY_WORDS, rng.randint(1, 2)))
                a, v, d = (round(x + rng.uniform(-1, 1)) for x in r["_attrs"])
                a, v, d = (min(7, max(1, x)) for x in (a, v, d))
                w.writerow([r["FileName"], f"{worker}; {word}; {secondary}; A:{a:.1f}; V:{v:.1f}; D:{d:.1f};"])
    for r in rows:
        if r["_has_transcript"]:
            (stage / "Transcripts" / (r["FileName"][:-4] + ".txt")).write_text(r["_transcript"] + "\n",
                                                                                 encoding="utf-8")
    with open(stage / META_NAME, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["FileName", "EmoClass", "Split_Set", "pool", "sentence", "pattern", "voice", "pitch", "speed",
                    "amp", "gap", "shift_cents"])
        for r in rows:
            p = r["_prosody"]
            w.writerow([r["FileName"], r["EmoClass"], r["Split_Set"], r["_pool"], r["_sentence"],
                        CLASS_PATTERN[r["EmoClass"]], r["_voice"], p["pitch"], p["speed"], p["amp"], p["gap"],
                        p["shift"]])
    jobs = [dict(out=stage / "Audios" / r["FileName"], voice=r["_voice"], text=r["_sentence"], **r["_prosody"])
            for r in rows]
    _run_jobs(jobs, workers)
    (stage / COUNTS_NAME).write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    m, s = counts["manifest"], counts["sentences"]
    (stage / README_NAME).write_text(
        "Synthetic mini MSP-Podcast (v1.12 layout), generated by tools/make_mini_corpora.py with espeak-ng + sox.\n"
        "Not real speech data; for tests and smoke runs only.\n"
        f"seed: {counts['seed']}\nn_msp: {counts['n_msp']}\nlabels_consensus rows: {counts['rows']}\n"
        f"manifest utterances (O/X dropped, Test1 as test): train {m['train']['total']}, "
        f"valid {m['valid']['total']}, test {m['test']['total']}\n"
        f"dropped O: {counts['dropped']['O']}, X: {counts['dropped']['X']}; Test2 rows: {counts['test2']}\n"
        f"rows without transcript: {len(counts['without_transcript'])}\n"
        f"sentences: per-class banks and prosody patterns as in the docstring of tools/make_mini_corpora.py; "
        f"transcribed Test1 utterances whose sentence is in transcribed Train: "
        f"{s['test_utterances_with_sentence_in_train']} of {s['test_utterances']}\n"
        f"per-utterance pool, sentence and prosody: {META_NAME}\n"
        f"expected counts: {COUNTS_NAME}\n", encoding="utf-8")


def _write_libri(stage, rng, n_train, n_eval, workers, seed):
    sizes = {"train-clean-100": n_train, "dev-clean": n_eval, "test-clean": n_eval}
    spk_ids = iter(rng.sample(range(100, 9000), sum(len(v) for v in LIBRI_VOICES.values())))
    jobs, counts, texts = [], {"seed": seed, "splits": {}}, {}
    for split, n in sizes.items():
        chapters = []  # (speaker, chapter, voice): 2 chapters per speaker
        for voice in LIBRI_VOICES[split]:
            spk = next(spk_ids)
            for chap in sorted(rng.sample(range(1000, 99999), 2)):
                chapters.append((str(spk), str(chap), voice))
        per_chapter = Counter()
        trans = {}
        # train-clean-100 cycles through the bank; dev/test draw from it (their speakers are unseen).
        drawn = _cycle(rng, LIBRI, n) if split == "train-clean-100" else [rng.choice(LIBRI) for _ in range(n)]
        texts[split] = drawn
        for i, sentence in enumerate(drawn):
            spk, chap, voice = chapters[i % len(chapters)]
            utt = f"{spk}-{chap}-{per_chapter[(spk, chap)]:04d}"
            per_chapter[(spk, chap)] += 1
            folder = stage / split / spk / chap
            folder.mkdir(parents=True, exist_ok=True)
            trans.setdefault(folder / f"{spk}-{chap}.trans.txt", []).append(f"{utt} {_libri_text(sentence)}")
            jobs.append(dict(out=folder / f"{utt}.flac", voice=voice, text=sentence, **_prosody(rng, "flat")))
        for path, lines in trans.items():
            path.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
        first = sorted(trans)[0]
        counts["splits"][split] = {
            "utterances": n, "speakers": len({spk for spk, _ in per_chapter}), "chapters": len(per_chapter),
            "example": dict(zip(("id", "wrd"), sorted(trans[first])[0].split(" ", 1))),
        }
    counts["sentences"] = _sentence_overlap(texts["train-clean-100"], texts["test-clean"])
    _run_jobs(jobs, workers)
    (stage / COUNTS_NAME).write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    s = counts["sentences"]
    (stage / README_NAME).write_text(
        "Synthetic mini LibriSpeech, generated by tools/make_mini_corpora.py with espeak-ng + sox.\n"
        "Not real speech data; for tests and smoke runs only.\n"
        f"seed: {seed}\n" + "".join(f"{k}: {v['utterances']} utterances, {v['speakers']} speakers, "
                                    f"{v['chapters']} chapters\n" for k, v in counts["splits"].items())
        + "text: the neutral pool 'libri' of tools/sentences.txt; test-clean utterances whose sentence is in "
        f"train-clean-100: {s['test_utterances_with_sentence_in_train']} of {s['test_utterances']}\n"
        f"expected counts: {COUNTS_NAME}\n", encoding="utf-8")
    return counts


def make_mini_corpora(msp_out=None, libri_out=None, seed=1234, n_msp=240, n_libri=60, n_libri_eval=16, workers=4,
                      msp_test_factor=1):
    """Generate the corpora (either output may be None to skip it). Returns ``{"msp": counts, "libri": counts}``.

    ``n_msp``: labelled 8-class utterances (n_msp // 8 per class, 60/20/20 over Train/Development/Test1),
    plus n_msp // 30 rows each of O, X and Test2. ``msp_test_factor``: Test1 rows per class times this (a larger
    test split for narrower CIs at the cost of evaluation only; any factor other than 1 draws a different corpus).
    ``n_libri``: train-clean-100 utterances; ``n_libri_eval``: dev-clean and test-clean utterances each.
    """
    if not (isinstance(msp_test_factor, int) and msp_test_factor >= 1):
        raise DataError(f"msp_test_factor must be an integer >= 1, got {msp_test_factor!r}")
    _check_tools()
    result = {}
    # Separate generators so that the MSP corpus does not depend on the LibriSpeech sizes and vice versa.
    if msp_out is not None:
        rng = random.Random(f"{seed}-msp")
        rows = _plan_msp(rng, n_msp, msp_test_factor)
        counts = _msp_counts(rows, seed, n_msp)
        if msp_test_factor != 1:  # recorded only when used: the default corpus stays byte-identical
            counts["msp_test_factor"] = msp_test_factor
        with atomic_dir(msp_out, README_NAME, "make_mini_corpora") as stage:
            _write_msp(stage, rows, counts, workers, rng)
        result["msp"] = counts
    if libri_out is not None:
        rng = random.Random(f"{seed}-libri")
        with atomic_dir(libri_out, README_NAME, "make_mini_corpora") as stage:
            result["libri"] = _write_libri(stage, rng, n_libri, n_libri_eval, workers, seed)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--msp_out", help="output root of the mini MSP-Podcast corpus")
    p.add_argument("--libri_out", help="output root of the mini LibriSpeech corpus")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n_msp", type=int, default=240, help="labelled 8-class utterances")
    p.add_argument("--msp_test_factor", type=int, default=1, help="Test1 utterances per class, times this")
    p.add_argument("--n_libri", type=int, default=60, help="train-clean-100 utterances")
    p.add_argument("--n_libri_eval", type=int, default=16, help="dev-clean and test-clean utterances each")
    p.add_argument("--workers", type=int, default=4, help="parallel espeak-ng/sox processes")
    args = p.parse_args(argv)
    if args.msp_out is None and args.libri_out is None:
        p.error("give --msp_out and/or --libri_out")
    res = make_mini_corpora(args.msp_out, args.libri_out, args.seed, args.n_msp, args.n_libri,
                            args.n_libri_eval, args.workers, args.msp_test_factor)
    if "msp" in res:
        m = res["msp"]["manifest"]
        print(f"MSP-Podcast mini corpus: {args.msp_out} ({res['msp']['rows']} rows; "
              + ", ".join(f"{k} {v['total']}" for k, v in m.items()) + ")")
    if "libri" in res:
        print(f"LibriSpeech mini corpus: {args.libri_out} ("
              + ", ".join(f"{k} {v['utterances']}" for k, v in res["libri"]["splits"].items()) + ")")


if __name__ == "__main__":
    main()
