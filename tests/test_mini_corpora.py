"""The synthetic corpora have exactly the real on-disk layouts, the promised sizes, and are seed-deterministic."""
import csv
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tools.make_mini_corpora import make_mini_corpora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "MSP-Podcast"))
from msp_podcast_prepare import LETTER_TO_EMOTION, WORD_TO_EMOTION  # noqa: E402

CONSENSUS_HEADER = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]


def _consensus(root):
    with open(root / "Labels" / "labels_consensus.csv", newline="") as f:
        return list(csv.reader(f))


def test_msp_layout_and_header(mini_corpora):
    root = mini_corpora.msp
    rows = _consensus(root)
    assert rows[0] == CONSENSUS_HEADER
    names = [r[0] for r in rows[1:]]
    assert len(names) == len(set(names)) == 264
    for r in rows[1:]:
        assert re.fullmatch(r"MSP-PODCAST_\d{4}_\d{4}\.wav", r[0])
        assert (root / "Audios" / r[0]).is_file()
        assert r[1] in "ACDFHNSUOX" and len(r[1]) == 1
        assert r[5] == "Unknown" or r[5].isdigit()
        assert r[6] in ("Male", "Female", "Unknown")
        assert r[7] in ("Train", "Development", "Test1", "Test2")
        assert all(1.0 <= float(x) <= 7.0 for x in r[2:5])
    assert sorted(p.name for p in (root / "Audios").iterdir()) == sorted(names)
    # ~15% without transcript: round(0.15 * 264) = 40
    no_trans = set(mini_corpora.msp_counts["without_transcript"])
    assert len(no_trans) == 40
    txts = {p.stem for p in (root / "Transcripts").iterdir()}
    assert txts == {n[:-4] for n in names} - no_trans
    readme = (root / "README_generated.txt").read_text()
    assert "seed: 1234" in readme and "labels_consensus rows: 264" in readme
    info = sf.info(str(root / "Audios" / names[0]))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")


def test_msp_split_and_class_counts(mini_corpora):
    rows = _consensus(mini_corpora.msp)[1:]
    got = Counter((r[7], r[1]) for r in rows)
    # n_msp=240: 30 per class, 60/20/20 -> 18/6/6; 240 // 30 = 8 rows each of O, X and Test2.
    for letter in LETTER_TO_EMOTION:
        assert got[("Train", letter)] == 18
        assert got[("Development", letter)] == 6
        assert got[("Test1", letter)] == 6
    assert sum(v for (s, ltr), v in got.items() if ltr == "O") == 8
    assert sum(v for (s, ltr), v in got.items() if ltr == "X") == 8
    assert sum(v for (s, ltr), v in got.items() if s == "Test2") == 8
    counts = mini_corpora.msp_counts
    assert counts["split_set_letters"] == {
        s: dict(sorted(Counter(r[1] for r in rows if r[7] == s).items())) for s in {r[7] for r in rows}}
    assert counts["manifest"]["train"]["total"] == 144
    assert counts["manifest"]["valid"]["total"] == counts["manifest"]["test"]["total"] == 48


def test_msp_detailed_votes(mini_corpora):
    root = mini_corpora.msp
    consensus = {r[0]: r[1] for r in _consensus(root)[1:]}
    with open(root / "Labels" / "labels_detailed.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["FileName", "EmoDetail"]
    votes = {}
    for name, detail in rows[1:]:
        m = re.fullmatch(r"WORKER\d{5}; ([A-Za-z-]+); ([A-Za-z,]+); A:(\d\.0); V:(\d\.0); D:(\d\.0);", detail)
        assert m, detail
        votes.setdefault(name, []).append(m.group(1))
    no_detail = {s + ".wav" for s in mini_corpora.msp_counts["without_detailed_votes"]}
    assert len(no_detail) == 2
    assert set(votes) == set(consensus) - no_detail
    for name, words in votes.items():
        assert len(words) == 5
        letter = consensus[name]
        if letter in LETTER_TO_EMOTION:  # strict majority agrees with the consensus class
            agree = sum(WORD_TO_EMOTION.get(w.lower()) == LETTER_TO_EMOTION[letter] for w in words)
            assert agree >= 3, (name, words)


def test_emotion_classes_have_distinct_prosody(mini_corpora):
    """Sadness is rendered slow and quiet, Anger fast and loud: a tiny model has something to learn."""
    rows = _consensus(mini_corpora.msp)[1:]
    stats = {}
    for letter in ("A", "S"):
        files = [r[0] for r in rows if r[1] == letter][:8]
        audio = [sf.read(str(mini_corpora.msp / "Audios" / n))[0] for n in files]
        stats[letter] = (np.mean([len(a) for a in audio]), np.mean([np.sqrt(np.mean(a ** 2)) for a in audio]))
    assert stats["S"][0] > 1.5 * stats["A"][0]  # longer
    assert stats["A"][1] > 2.0 * stats["S"][1]  # louder


def test_libri_layout_and_counts(mini_corpora):
    root = mini_corpora.libri
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["dev-clean", "test-clean", "train-clean-100"]
    speakers = {}
    for split, n in (("train-clean-100", 60), ("dev-clean", 16), ("test-clean", 16)):
        flacs = sorted((root / split).glob("*/*/*.flac"))
        assert len(flacs) == n
        chapters = {f.parent for f in flacs}
        speakers[split] = {c.parent.name for c in chapters}
        assert len(speakers[split]) == 4 and len(chapters) == 8
        listed = set()
        for chap in chapters:
            spk, ch = chap.parent.name, chap.name
            lines = (chap / f"{spk}-{ch}.trans.txt").read_text().splitlines()
            for line in lines:
                utt, text = line.split(" ", 1)
                assert re.fullmatch(rf"{spk}-{ch}-\d{{4}}", utt)
                assert re.fullmatch(r"[A-Z' ]+", text) and "  " not in text
                listed.add(utt)
            assert sorted(p.name for p in chap.iterdir()) == sorted(
                [f"{spk}-{ch}.trans.txt"] + [ln.split(" ")[0] + ".flac" for ln in lines])
        assert listed == {f.stem for f in flacs}
        assert mini_corpora.libri_counts["splits"][split]["utterances"] == n
        info = sf.info(str(flacs[0]))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
    # speaker-disjoint splits, as in LibriSpeech
    assert len(speakers["train-clean-100"] | speakers["dev-clean"] | speakers["test-clean"]) == 12


def test_same_seed_same_bytes(tmp_path):
    kw = dict(n_msp=16, n_libri=4, n_libri_eval=2)
    make_mini_corpora(tmp_path / "a_msp", tmp_path / "a_libri", seed=7, **kw)
    make_mini_corpora(tmp_path / "b_msp", tmp_path / "b_libri", seed=7, **kw)
    make_mini_corpora(tmp_path / "c_msp", None, seed=8, **kw)
    csv_a = (tmp_path / "a_msp/Labels/labels_consensus.csv").read_bytes()
    assert csv_a == (tmp_path / "b_msp/Labels/labels_consensus.csv").read_bytes()
    assert csv_a != (tmp_path / "c_msp/Labels/labels_consensus.csv").read_bytes()
    name = csv_a.decode().splitlines()[1].split(",")[0]
    assert (tmp_path / "a_msp/Audios" / name).read_bytes() == (tmp_path / "b_msp/Audios" / name).read_bytes()
    flac = sorted((tmp_path / "a_libri").rglob("*.flac"))[0].relative_to(tmp_path / "a_libri")
    assert (tmp_path / "a_libri" / flac).read_bytes() == (tmp_path / "b_libri" / flac).read_bytes()
    # n_msp=16: 2 per class -> Train 1, Development 0, Test1 1; plus 1 O, 1 X, 1 Test2
    rows = _consensus(tmp_path / "a_msp")[1:]
    assert len(rows) == 19 and sum(r[1] == "O" for r in rows) == 1


def test_refuses_to_replace_foreign_folder_and_cli(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        make_mini_corpora(foreign, None, n_msp=8)
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging folder left behind
    out = subprocess.run([sys.executable, "-m", "tools.make_mini_corpora", "--libri_out", str(tmp_path / "lib"),
                          "--n_libri", "3", "--n_libri_eval", "1", "--seed", "3"],
                         capture_output=True, text=True, check=True)
    assert "train-clean-100 3, dev-clean 1, test-clean 1" in out.stdout
    assert len(list((tmp_path / "lib").rglob("*.flac"))) == 5
