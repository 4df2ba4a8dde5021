#!/usr/bin/env python3
"""Generate a tiny synthetic IEMOCAP in the real ``IEMOCAP_full_release`` layout with espeak-ng + sox.

    python recipes/IEMOCAP/make_mini_iemocap.py --out data/mini_iemocap [--seed 1234]

5 sessions x 2 speakers (one F, one M espeak-ng voice each) x 2 dialogs (``Ses0kF_impro01``,
``Ses0kM_script01_1``) x 6 evaluated utterances. Every session holds the same consensus codes, shuffled:
``neu`` x3, ``hap``, ``exc`` x2, ``ang`` x2, ``sad`` x2, ``fru``, ``xxx``; so the 4-class setup (exc merged
into hap, fru/xxx dropped) keeps neu 3, hap 3, ang 2, sad 2 per session (50 in all), whatever the seed.
Evaluator lines (``C-E#`` plus the speaker's own ``C-F1``/``C-M1``) mostly agree with the consensus and
sometimes disagree or name two categories; transcripts carry IEMOCAP-style ``[LAUGHTER]`` tags, one holds
digits and one is only ``[BREATHING]`` (empty after normalisation). The real layout's distractors are there
too: EmoEvaluation subfolders (``Categorical/``), a ``%`` header line and transcription lines of
non-evaluated turns (``..._MXX0``). Everything is a pure function of the seed; ``mini_counts.json`` in the
output holds the expected counts; the corpus is built in a hidden sibling folder and renamed into place.
Self-contained (its own sentences, prosody and espeak-ng/sox calls) so that changes to the MSP/LibriSpeech
generator in tools/make_mini_corpora.py do not change this corpus.
"""
import argparse
import json
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lobes.io_utils import atomic_dir

COUNTS_NAME = "mini_counts.json"
README_NAME = "README_generated.txt"  # marks a folder this tool made (only such a folder is replaced)
N_SESSIONS = 5
SESSION_CODES = ["neu", "neu", "neu", "hap", "exc", "exc", "ang", "ang", "sad", "sad", "fru", "xxx"]
UTTS_PER_DIALOG = 6
FOUR_CLASS = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
# espeak-ng voices: session k -> (female, male)
VOICES = [("en-us+f1", "en-us+m1"), ("en-gb+f2", "en-gb+m2"), ("en-029+f3", "en-gb-x-rp+m3"),
          ("en-us+f4", "en-us-nyc+m4"), ("en-gb-scotland+f5", "en-029+m5")]
# Prosody per consensus code: espeak-ng pitch (0-99), speed (words/min), amplitude (0-200), word gap (x10 ms).
PROSODY = {"neu": (50, 170, 100, 0), "hap": (80, 205, 125, 0), "exc": (88, 225, 140, 0), "ang": (62, 230, 170, 0),
           "sad": (18, 105, 50, 4), "fru": (30, 150, 150, 2), "xxx": (55, 175, 105, 1)}
# Short conversational lines without digits or abbreviations (espeak-ng says exactly the transcript's words).
SENTENCES = [
    "Excuse me, is this the right line?", "I told you this would happen.", "That's the best news I've heard all week!",
    "Why didn't you call me back?", "I don't know what to say.", "We could go to the beach tomorrow.",
    "You never listen to me.", "It's fine, really, don't worry about it.", "I miss him so much.",
    "Get out of my way!", "Can you believe it? We won!", "Let me check with the manager.",
    "I waited here for two hours.", "Where are you going now?", "Oh, that's wonderful.",
    "Nobody cares what I think.", "Just fill in the form, please.", "I can't do this anymore.",
]
WORD = {"neu": "Neutral", "hap": "Happiness", "exc": "Excited", "ang": "Anger", "sad": "Sadness",
        "fru": "Frustration", "sur": "Surprise", "oth": "Other"}
VAD = {"neu": (3.0, 2.5, 3.0), "hap": (4.0, 3.5, 3.0), "exc": (4.0, 4.0, 3.5), "ang": (1.5, 4.0, 4.0),
       "sad": (1.5, 2.0, 2.0), "fru": (2.0, 3.5, 3.5), "xxx": (2.5, 3.0, 3.0)}
DIGITS_TRANSCRIPT = "I was born in 1990."
DIGITS_WRD = "I WAS BORN IN NINETEEN NINETY"


def _check_tools():
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"make_mini_iemocap needs '{tool}' on PATH (Debian packages espeak-ng, sox)")


def _prosody(rng, code):
    pitch, speed, amp, gap = PROSODY[code]
    return {"pitch": min(99, max(0, pitch + rng.randint(-4, 4))), "speed": round(speed * rng.uniform(0.94, 1.06)),
            "amp": round(amp * rng.uniform(0.92, 1.08)), "gap": gap}


def _synthesize(job):
    """One utterance: espeak-ng -> sox -> 16 kHz mono 16-bit wav; sox -R -D keeps the output a function of the
    input (byte-identical reruns)."""
    raw = Path(job["tmpdir"]) / f"{job['index']}.wav"
    subprocess.run(["espeak-ng", "-v", job["voice"], "-p", str(job["pitch"]), "-s", str(job["speed"]),
                    "-a", str(job["amp"]), "-g", str(job["gap"]), "-w", str(raw), job["text"]],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run(["sox", "-R", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer",
                    str(job["out"]), "pad", "0.05", "0.05"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw.unlink()


def _run_jobs(jobs, workers):
    with tempfile.TemporaryDirectory(prefix="mini_iemocap_") as tmpdir:
        for i, job in enumerate(jobs):
            job["index"], job["tmpdir"] = i, tmpdir
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_synthesize, jobs))


def _dialogs(session):
    return [f"Ses{session:02d}F_impro01", f"Ses{session:02d}M_script01_1"]


def _evaluator_votes(rng, code):
    """Category lists of 3 external evaluators and the speaker's self-evaluation (``None`` = no self line)."""
    if code == "xxx":  # no agreement
        cats = rng.sample(["neu", "hap", "ang", "sad", "fru", "exc"], 3)
        votes = [[c] for c in cats]
    else:
        main = [code] if code != "exc" else rng.choice([["exc"], ["exc"], ["hap", "exc"]])
        votes = [list(main), list(main)]
        third = rng.random()
        if third < 0.4:
            votes.append(list(main))
        elif third < 0.7:  # disagreement
            votes.append([rng.choice([c for c in ("neu", "fru", "sad", "ang", "sur") if c != code])])
        else:  # two categories on one line
            votes.append([code, rng.choice([c for c in ("fru", "sur", "neu") if c != code])])
    self_vote = [code if code != "xxx" else "oth"] if rng.random() < 0.5 else None
    return votes, self_vote


def plan(seed, sentences=SENTENCES):
    """All utterances with their labels, votes, transcript and synthesis settings (no I/O)."""
    rng = random.Random(f"{seed}-iemocap")
    utts = []
    for session in range(1, N_SESSIONS + 1):
        codes = list(SESSION_CODES)
        rng.shuffle(codes)
        for d, dialog in enumerate(_dialogs(session)):
            t, n_by_gender = 2.0, {"F": 0, "M": 0}
            gender = rng.choice("FM")
            for code in codes[d * UTTS_PER_DIALOG:(d + 1) * UTTS_PER_DIALOG]:
                utt = f"{dialog}_{gender}{n_by_gender[gender]:03d}"
                n_by_gender[gender] += 1
                sentence = rng.choice(sentences)
                dur = round(rng.uniform(1.2, 2.6), 4)
                votes, self_vote = _evaluator_votes(rng, code)
                v, a, dom = (x + rng.choice([-0.5, 0.0, 0.5]) for x in VAD[code])
                utts.append({
                    "utt": utt, "session": session, "dialog": dialog, "gender": gender, "code": code,
                    "start": round(t, 4), "end": round(t + dur, 4), "vad": (v, a, dom),
                    "evaluators": sorted(rng.sample(["E1", "E2", "E3", "E4", "E5"], 3)), "votes": votes,
                    "self_vote": self_vote, "sentence": sentence, "transcript": sentence,
                    "voice": VOICES[session - 1][0 if gender == "F" else 1],
                    "prosody": _prosody(rng, code),
                })
                t += dur + rng.uniform(0.3, 1.0)
                gender = "M" if gender == "F" else "F"
    # Transcript quirks at seed-chosen places: laughter tags, a digits-only reading, an annotation-only turn.
    picks = rng.sample(range(len(utts)), 5)
    for i in picks[:3]:
        utts[i]["transcript"] = "[LAUGHTER] " + utts[i]["sentence"]
    utts[picks[3]]["transcript"] = utts[picks[3]]["sentence"] = DIGITS_TRANSCRIPT
    utts[picks[4]]["transcript"] = "[BREATHING]"
    return utts


def counts_of(utts, seed):
    """Expected prepare results for the default 4-class map (computed from the plan, not from the prepare)."""
    per_session = {str(s): {c: 0 for c in ("neu", "hap", "ang", "sad")} for s in range(1, N_SESSIONS + 1)}
    for u in utts:
        if u["code"] in FOUR_CLASS:
            per_session[str(u["session"])][FOUR_CLASS[u["code"]]] += 1
    return {
        "seed": seed,
        "utterances": len(utts),
        "per_session": per_session,
        "total_4class": sum(sum(c.values()) for c in per_session.values()),
        "codes": {c: sum(u["code"] == c for u in utts) for c in sorted(set(SESSION_CODES))},
        "speakers": sorted({f"Ses{u['session']:02d}_{u['gender']}" for u in utts}),
        "per_speaker_4class": {spk: sum(f"Ses{u['session']:02d}_{u['gender']}" == spk for u in utts
                                        if u["code"] in FOUR_CLASS)
                               for spk in sorted({f"Ses{u['session']:02d}_{u['gender']}" for u in utts})},
        "empty_transcripts": sorted(u["utt"] for u in utts if u["transcript"] == "[BREATHING]"),
        "digits_transcript": {u["utt"]: DIGITS_WRD for u in utts if u["transcript"] == DIGITS_TRANSCRIPT},
    }


def _fmt(x):
    return f"{x:.4f}"


def _write(stage, utts, counts, workers):
    by_dialog = {}
    for u in utts:
        by_dialog.setdefault((u["session"], u["dialog"]), []).append(u)
    jobs = []
    for (session, dialog), items in by_dialog.items():
        sdir = stage / f"Session{session}"
        emo_dir, trans_dir = sdir / "dialog" / "EmoEvaluation", sdir / "dialog" / "transcriptions"
        (emo_dir / "Categorical").mkdir(parents=True, exist_ok=True)
        trans_dir.mkdir(parents=True, exist_ok=True)
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for u in items:
            lines.append(f"[{_fmt(u['start'])} - {_fmt(u['end'])}]\t{u['utt']}\t{u['code']}\t"
                         f"[{', '.join(_fmt(x) for x in u['vad'])}]")
            for ev, cats in zip(u["evaluators"], u["votes"]):
                lines.append(f"C-{ev}:\t" + " ".join(f"{WORD[c]};" for c in cats) + "\t()")
            if u["self_vote"] is not None:
                lines.append(f"C-{u['gender']}1:\t{WORD[u['self_vote'][0]]};\t(self)")
            lines.append(f"A-{u['evaluators'][0]}:\tval {round(u['vad'][0])}; act {round(u['vad'][1])}; "
                         f"dom  {round(u['vad'][2])};\t()")
            lines.append("")
        (emo_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (emo_dir / "Categorical" / f"{dialog}_e1_cat.txt").write_text(
            "".join(f"{u['utt']} :{WORD.get(u['code'], 'Other')}; ()\n" for u in items), encoding="utf-8")
        # Transcriptions: every turn, plus a non-evaluated one (real files have ..._MXX0 / _FXX0 turns).
        t_lines = [f"{u['utt']} [{u['start']:08.4f}-{u['end']:08.4f}]: {u['transcript']}" for u in items]
        last = items[-1]
        t_lines.append(f"{dialog}_MXX0 [{last['end'] + 0.1:08.4f}-{last['end'] + 0.9:08.4f}]: [BREATHING] Okay.")
        (trans_dir / f"{dialog}.txt").write_text("\n".join(t_lines) + "\n", encoding="utf-8")
        wav_dir = sdir / "sentences" / "wav" / dialog
        wav_dir.mkdir(parents=True, exist_ok=True)
        jobs += [dict(out=wav_dir / f"{u['utt']}.wav", voice=u["voice"], text=u["sentence"], **u["prosody"])
                 for u in items]
    _run_jobs(jobs, workers)
    (stage / COUNTS_NAME).write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    (stage / README_NAME).write_text(
        "Synthetic mini IEMOCAP (IEMOCAP_full_release layout), generated by recipes/IEMOCAP/make_mini_iemocap.py "
        "with espeak-ng + sox.\nNot real speech data; for tests and smoke runs only.\n"
        f"seed: {counts['seed']}\nevaluated utterances: {counts['utterances']}; 4-class (exc->hap): "
        f"{counts['total_4class']}\nexpected counts: {COUNTS_NAME}\n", encoding="utf-8")


def make_mini_iemocap(out, seed=1234, workers=4):
    """Generate the corpus at ``out`` (the ``IEMOCAP_full_release`` folder). Returns the expected counts."""
    _check_tools()
    utts = plan(seed)
    counts = counts_of(utts, seed)
    with atomic_dir(out, README_NAME, "make_mini_iemocap") as stage:
        _write(stage, utts, counts, workers)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output IEMOCAP_full_release folder")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=4, help="parallel espeak-ng/sox processes")
    args = p.parse_args(argv)
    counts = make_mini_iemocap(args.out, args.seed, args.workers)
    print(f"mini IEMOCAP: {args.out} ({counts['utterances']} evaluated utterances, {counts['total_4class']} in the "
          "4 classes)")


if __name__ == "__main__":
    main()
