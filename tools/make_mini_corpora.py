"""Generate tiny synthetic MSP-Podcast (v1.12 layout) and LibriSpeech corpora with espeak-ng + sox.

    python -m tools.make_mini_corpora --msp_out data/mini_msp --libri_out data/mini_libri [--seed 1234]

Everything is a pure function of the seed: the same seed gives byte-identical label files and audio.
Emotion classes are rendered with distinct pitch / speaking-rate / loudness / word-gap patterns (plus small
jitter) so that a tiny model can learn them; speakers are espeak-ng voices with different variants.
Each corpus is built in a hidden sibling folder and renamed into place, so a failed run leaves nothing
half-written; an existing output folder is only replaced if it was made by this tool.
"""
import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "MSP-Podcast"))
from msp_podcast_prepare import LETTER_TO_EMOTION, MSP_CLASSES as EMOTIONS  # noqa: E402

SENTENCES_FILE = Path(__file__).with_name("sentences.txt")
README_NAME = "README_generated.txt"
COUNTS_NAME = "mini_counts.json"

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

LIBRI_VOICES = ["en-us+m1", "en-gb+f1", "en-gb-x-rp+m4", "en-us+f5", "en-029+m5", "en-gb-scotland+f2",
                "en-us-nyc+m6", "en-gb-x-gbclan+f4", "en-us+m8", "en-gb+f3", "en-029+m2", "en-us+f1"]

# Prosody per class: espeak-ng pitch (0-99), speed (words/min), amplitude (0-200), word gap (x10 ms).
PROSODY = {
    "A": (62, 230, 170, 0),  # Anger: loud, fast, high
    "C": (32, 165, 95, 2),   # Contempt: low, mid rate
    "D": (22, 125, 150, 2),  # Disgust: low, slow, loud
    "F": (78, 240, 55, 0),   # Fear: high, fast, quiet
    "H": (82, 205, 125, 0),  # Happiness: high, fast
    "N": (50, 170, 100, 0),  # Neutral: mid everything
    "S": (18, 105, 50, 4),   # Sadness: low, slow, quiet, pauses
    "U": (98, 185, 140, 1),  # Surprise: very high pitch
    "O": (45, 180, 110, 0),
    "X": (55, 175, 105, 1),
}
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


def load_sentences(path=SENTENCES_FILE):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


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
    cmd = ["sox", "-R", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(out),
           "pad", "0.05", "0.05"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw.unlink()


def _run_jobs(jobs, workers):
    with tempfile.TemporaryDirectory(prefix="mini_corpora_") as tmpdir:
        for i, job in enumerate(jobs):
            job["index"], job["tmpdir"] = i, tmpdir
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_synthesize, jobs))


def _prosody(rng, letter):
    pitch, speed, amp, gap = PROSODY[letter]
    return {
        "pitch": min(99, max(0, pitch + rng.randint(-4, 4))),
        "speed": int(round(speed * rng.uniform(0.94, 1.06))),
        "amp": int(round(amp * rng.uniform(0.92, 1.08))),
        "gap": gap,
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


def _prepare_out(out):
    """Staging folder next to ``out``; refuses to replace a non-empty folder this tool did not make."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / README_NAME).exists():
        raise FileExistsError(f"{out} exists, is not empty and was not made by make_mini_corpora; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(stage, out):
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)


def _split_sizes(n):
    n_train, n_dev = round(0.6 * n), round(0.2 * n)
    return {"Train": n_train, "Development": n_dev, "Test1": n - n_train - n_dev}


def _plan_msp(rng, sentences, n_msp):
    """All rows of labels_consensus.csv with their prosody, votes and transcript (no I/O)."""
    per_class = max(1, n_msp // len(LABELLED))
    n_extra = max(1, n_msp // 30)
    specs = []  # (letter, Split_Set)
    for letter in LABELLED:
        for split, k in _split_sizes(per_class).items():
            specs += [(letter, split)] * k
    specs += [("O", "Train")] * n_extra
    specs += [("X", rng.choice(["Train", "Development", "Test1"])) for _ in range(n_extra)]
    specs += [(rng.choice(LABELLED), "Test2") for _ in range(n_extra)]
    rng.shuffle(specs)

    seg_counter = Counter()
    rows = []
    for letter, split in specs:
        if rng.random() < UNKNOWN_SPEAKER_RATE:
            spk, gender, voice, podcast = "Unknown", "Unknown", UNKNOWN_SPEAKER_VOICE, 99
        else:
            k = rng.randrange(len(MSP_SPEAKERS))
            (spk, gender, voice), podcast = MSP_SPEAKERS[k], k + 1
        seg_counter[podcast] += 1
        act, val, dom = (m + rng.uniform(-0.6, 0.6) for m in ATTRIBUTES[letter])
        rows.append({
            "FileName": f"MSP-PODCAST_{podcast:04d}_{seg_counter[podcast]:04d}.wav",
            "EmoClass": letter, "EmoAct": _fmt_attr(act), "EmoVal": _fmt_attr(val), "EmoDom": _fmt_attr(dom),
            "SpkrID": spk, "Gender": gender, "Split_Set": split,
            "_voice": voice, "_prosody": _prosody(rng, letter), "_sentence": rng.choice(sentences),
            "_votes": _votes(rng, letter), "_attrs": (act, val, dom),
        })
    rows.sort(key=lambda r: r["FileName"])

    # ~15% of utterances have no transcript file; a couple of labelled files have no detailed votes.
    no_transcript = set(rng.sample(range(len(rows)), round(0.15 * len(rows))))
    labelled_idx = [i for i, r in enumerate(rows) if r["EmoClass"] in LABELLED and r["Split_Set"] != "Test2"]
    no_detail = set(rng.sample(labelled_idx, max(1, n_msp // 120)))
    for i, r in enumerate(rows):
        r["_has_transcript"] = i not in no_transcript
        r["_has_detail"] = i not in no_detail
        # Transcript files vary case and spacing so that normalisation is exercised.
        text = r["_sentence"]
        style = rng.random()
        if style < 0.2:
            text = text.lower()
        elif style < 0.35:
            text = "  " + text.replace(" ", "  ") + " "
        r["_transcript"] = text
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
    jobs = [dict(out=stage / "Audios" / r["FileName"], voice=r["_voice"], text=r["_sentence"], **r["_prosody"])
            for r in rows]
    _run_jobs(jobs, workers)
    (stage / COUNTS_NAME).write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    m = counts["manifest"]
    (stage / README_NAME).write_text(
        "Synthetic mini MSP-Podcast (v1.12 layout), generated by tools/make_mini_corpora.py with espeak-ng + sox.\n"
        "Not real speech data; for tests and smoke runs only.\n"
        f"seed: {counts['seed']}\nn_msp: {counts['n_msp']}\nlabels_consensus rows: {counts['rows']}\n"
        f"manifest utterances (O/X dropped, Test1 as test): train {m['train']['total']}, "
        f"valid {m['valid']['total']}, test {m['test']['total']}\n"
        f"dropped O: {counts['dropped']['O']}, X: {counts['dropped']['X']}; Test2 rows: {counts['test2']}\n"
        f"rows without transcript: {len(counts['without_transcript'])}\n"
        f"expected counts: {COUNTS_NAME}\n", encoding="utf-8")


def _write_libri(stage, rng, sentences, n_train, n_eval, workers, seed):
    sizes = {"train-clean-100": n_train, "dev-clean": n_eval, "test-clean": n_eval}
    spk_ids = rng.sample(range(100, 9000), 4 * len(sizes))
    voices = list(LIBRI_VOICES)
    jobs, counts = [], {"seed": seed, "splits": {}}
    for s, (split, n) in enumerate(sizes.items()):
        chapters = []  # (speaker, chapter, voice): 4 speakers x 2 chapters
        for k, spk in enumerate(spk_ids[4 * s: 4 * s + 4]):
            for chap in sorted(rng.sample(range(1000, 99999), 2)):
                chapters.append((str(spk), str(chap), voices[(4 * s + k) % len(voices)]))
        per_chapter = Counter()
        trans = {}
        for i in range(n):
            spk, chap, voice = chapters[i % len(chapters)]
            utt = f"{spk}-{chap}-{per_chapter[(spk, chap)]:04d}"
            per_chapter[(spk, chap)] += 1
            sentence = rng.choice(sentences)
            folder = stage / split / spk / chap
            folder.mkdir(parents=True, exist_ok=True)
            trans.setdefault(folder / f"{spk}-{chap}.trans.txt", []).append(f"{utt} {_libri_text(sentence)}")
            jobs.append(dict(out=folder / f"{utt}.flac", voice=voice, text=sentence, **_prosody(rng, "N")))
        for path, lines in trans.items():
            path.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
        first = sorted(trans)[0]
        counts["splits"][split] = {
            "utterances": n, "speakers": len({c[0] for c in chapters}), "chapters": len(per_chapter),
            "example": dict(zip(("id", "wrd"), sorted(trans[first])[0].split(" ", 1))),
        }
    _run_jobs(jobs, workers)
    (stage / COUNTS_NAME).write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    (stage / README_NAME).write_text(
        "Synthetic mini LibriSpeech, generated by tools/make_mini_corpora.py with espeak-ng + sox.\n"
        "Not real speech data; for tests and smoke runs only.\n"
        f"seed: {seed}\n" + "".join(f"{k}: {v['utterances']} utterances, {v['speakers']} speakers, "
                                    f"{v['chapters']} chapters\n" for k, v in counts["splits"].items())
        + f"expected counts: {COUNTS_NAME}\n", encoding="utf-8")
    return counts


def make_mini_corpora(msp_out=None, libri_out=None, seed=1234, n_msp=240, n_libri=60, n_libri_eval=16, workers=4):
    """Generate the corpora (either output may be None to skip it). Returns ``{"msp": counts, "libri": counts}``.

    ``n_msp``: labelled 8-class utterances (n_msp // 8 per class, 60/20/20 over Train/Development/Test1),
    plus n_msp // 30 rows each of O, X and Test2. ``n_libri``: train-clean-100 utterances;
    ``n_libri_eval``: dev-clean and test-clean utterances each.
    """
    _check_tools()
    sentences = load_sentences()
    result = {}
    # Separate generators so that the MSP corpus does not depend on the LibriSpeech sizes and vice versa.
    if msp_out is not None:
        rng = random.Random(f"{seed}-msp")
        rows = _plan_msp(rng, sentences, n_msp)
        counts = _msp_counts(rows, seed, n_msp)
        out, stage = _prepare_out(msp_out)
        try:
            _write_msp(stage, rows, counts, workers, rng)
            _publish(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        result["msp"] = counts
    if libri_out is not None:
        rng = random.Random(f"{seed}-libri")
        out, stage = _prepare_out(libri_out)
        try:
            result["libri"] = _write_libri(stage, rng, sentences, n_libri, n_libri_eval, workers, seed)
            _publish(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--msp_out", help="output root of the mini MSP-Podcast corpus")
    p.add_argument("--libri_out", help="output root of the mini LibriSpeech corpus")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n_msp", type=int, default=240, help="labelled 8-class utterances")
    p.add_argument("--n_libri", type=int, default=60, help="train-clean-100 utterances")
    p.add_argument("--n_libri_eval", type=int, default=16, help="dev-clean and test-clean utterances each")
    p.add_argument("--workers", type=int, default=4, help="parallel espeak-ng/sox processes")
    args = p.parse_args(argv)
    if args.msp_out is None and args.libri_out is None:
        p.error("give --msp_out and/or --libri_out")
    res = make_mini_corpora(args.msp_out, args.libri_out, args.seed, args.n_msp, args.n_libri,
                            args.n_libri_eval, args.workers)
    if "msp" in res:
        m = res["msp"]["manifest"]
        print(f"MSP-Podcast mini corpus: {args.msp_out} ({res['msp']['rows']} rows; "
              + ", ".join(f"{k} {v['total']}" for k, v in m.items()) + ")")
    if "libri" in res:
        print(f"LibriSpeech mini corpus: {args.libri_out} ("
              + ", ".join(f"{k} {v['utterances']}" for k, v in res["libri"]["splits"].items()) + ")")


if __name__ == "__main__":
    main()
