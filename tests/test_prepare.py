"""MSP-Podcast / LibriSpeech data preparation and lobes.audio: counts, labels, transcripts, errors."""
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lobes.audio import audio_info, check_audio, read_audio
from lobes.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "MSP-Podcast"))
from msp_podcast_prepare import LETTER_TO_EMOTION, MSP_CLASSES as EMOTIONS  # noqa: E402

MSP = "recipes/MSP-Podcast/msp_podcast_prepare.py"
LIBRI = "recipes/LibriSpeech/librispeech_prepare.py"
HEADER = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"


@pytest.fixture(scope="module")
def msp(load_recipe):
    return load_recipe(MSP)


@pytest.fixture(scope="module")
def libri(load_recipe):
    return load_recipe(LIBRI)


def _load(folder, split):
    return json.loads((folder / f"{split}.json").read_text())


def _write_wav(path, n=8000, sr=16000, channels=1, seed=0):
    x = np.random.default_rng(seed).uniform(-0.3, 0.3, (n, channels)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x if channels > 1 else x[:, 0], sr, subtype="PCM_16")


def _tiny_msp(root, rows, detailed=None, transcripts=None):
    """Hand-made corpus: rows = [(stem, letter, split)]; a 0.5 s 16 kHz wav per row."""
    (root / "Labels").mkdir(parents=True)
    lines = [f"{s}.wav,{ltr},3.0,4.0,4.0,7,Female,{split}\n" for s, ltr, split in rows]
    (root / "Labels" / "labels_consensus.csv").write_text(HEADER + "".join(lines))
    for i, (s, _, _) in enumerate(rows):
        _write_wav(root / "Audios" / f"{s}.wav", seed=i)
    if detailed is not None:
        (root / "Labels" / "labels_detailed.csv").write_text(detailed)
    for stem, text in (transcripts or {}).items():
        (root / "Transcripts").mkdir(exist_ok=True)
        (root / "Transcripts" / f"{stem}.txt").write_text(text)
    return root


# ----------------------------------------------------------------------------------------------- lobes.audio
def test_audio_read_and_checks(tmp_path):
    good = tmp_path / "good.wav"
    _write_wav(good, n=4000)
    assert audio_info(good) == (16000, 4000, 1)
    assert check_audio(good) == pytest.approx(0.25)
    x = read_audio(good)
    assert x.dtype == torch.float32 and x.shape == (4000,)
    np.testing.assert_allclose(x.numpy(), sf.read(str(good), dtype="float32")[0])

    bad = {"corrupt.wav": None, "empty.wav": dict(n=0), "eight_k.wav": dict(sr=8000), "stereo.wav": dict(channels=2)}
    for name, kw in bad.items():
        if kw is None:
            (tmp_path / name).write_bytes(b"RIFF\x00\x01garbage-not-a-wave-file" * 4)
        else:
            _write_wav(tmp_path / name, **kw)
        for fn in (check_audio, read_audio):
            with pytest.raises(DataError, match=name):
                fn(tmp_path / name, 16000)
    assert read_audio(tmp_path / "eight_k.wav", expected_sr=8000).shape == (8000,)


# ----------------------------------------------------------------------------------------------- MSP-Podcast
def test_msp_counts_per_split_and_class(mini_corpora, msp_manifests):
    expected = mini_corpora.msp_counts["manifest"]
    consensus = {}
    with open(mini_corpora.msp / "Labels" / "labels_consensus.csv", newline="") as f:
        for r in csv.DictReader(f):
            consensus[r["FileName"][:-4]] = r
    seen = set()
    for split, n in (("train", 144), ("valid", 48), ("test", 48)):
        man = _load(msp_manifests, split)
        assert len(man) == n == expected[split]["total"]
        per_class = {e: sum(v["emo"] == e for v in man.values()) for e in EMOTIONS}
        assert per_class == expected[split]["per_class"] == {e: n // 8 for e in EMOTIONS}
        for utt, item in man.items():
            row = consensus[utt]
            assert row["EmoClass"] not in ("O", "X") and row["Split_Set"] != "Test2"
            assert {"train": "Train", "valid": "Development", "test": "Test1"}[split] == row["Split_Set"]
            assert item["emo"] == LETTER_TO_EMOTION[row["EmoClass"]]
            assert (item["spk_id"], item["gender"]) == (row["SpkrID"], row["Gender"])
            assert item["wav"] == str(mini_corpora.msp / "Audios" / f"{utt}.wav")
            info = sf.info(item["wav"])
            assert item["duration"] == pytest.approx(info.frames / 16000, abs=1e-4)
        seen |= set(man)
    # 8 O + 8 X (all in Train/Development/Test1) and 8 Test2 rows are left out: 264 - 24 = 240
    dropped = {u for u, r in consensus.items() if r["EmoClass"] in ("O", "X") or r["Split_Set"] == "Test2"}
    assert len(dropped) == 24 and len(seen) == 240
    assert seen == set(consensus) - dropped


def test_msp_soft_labels(mini_corpora, msp_manifests):
    no_detail = set(mini_corpora.msp_counts["without_detailed_votes"])
    # Independent recount of one file's primary votes straight from the csv.
    probe = None
    for split in ("train", "valid", "test"):
        for utt, item in _load(msp_manifests, split).items():
            soft = item["emo_soft"]
            assert len(soft) == 8 and abs(sum(soft) - 1) < 1e-6
            assert int(np.argmax(soft)) == EMOTIONS.index(item["emo"])
            if utt in no_detail:
                assert soft == [float(e == item["emo"]) for e in EMOTIONS]
            elif probe is None and max(soft) < 1:
                probe = (utt, soft)
    assert probe is not None
    words = {"Angry": 0, "Contempt": 1, "Disgust": 2, "Fear": 3, "Happy": 4, "Neutral": 5, "Sad": 6, "Surprise": 7}
    counts = [0] * 8
    with open(mini_corpora.msp / "Labels" / "labels_detailed.csv", newline="") as f:
        for name, detail in list(csv.reader(f))[1:]:
            word = detail.split("; ")[1]
            if name == probe[0] + ".wav" and word in words:
                counts[words[word]] += 1
    assert probe[1] == pytest.approx([c / sum(counts) for c in counts], abs=1e-12)


def test_msp_transcripts(mini_corpora, msp_manifests):
    no_trans = set(mini_corpora.msp_counts["without_transcript"])
    n_wrd = 0
    for split in ("train", "valid", "test"):
        for utt, item in _load(msp_manifests, split).items():
            if utt in no_trans:
                assert "wrd" not in item
                continue
            raw = (mini_corpora.msp / "Transcripts" / f"{utt}.txt").read_text()
            assert item["wrd"] == " ".join(re.sub(r"[^A-Z' ]", " ", raw.upper()).split())
            assert re.fullmatch(r"[A-Z']+( [A-Z']+)*", item["wrd"])
            n_wrd += 1
    assert n_wrd == sum(v["total"] for v in mini_corpora.msp_counts["manifest_transcript_only"].values())


def test_msp_transcript_only_and_test_set(msp, mini_corpora, msp_manifests, tmp_path, capsys):
    msp.prepare_msp_podcast(mini_corpora.msp, tmp_path / "t", transcript_only=True, check_audio=False)
    expected = mini_corpora.msp_counts["manifest_transcript_only"]
    out = capsys.readouterr().out
    for split in ("train", "valid", "test"):
        man = _load(tmp_path / "t", split)
        assert len(man) == expected[split]["total"]
        assert {e: sum(v["emo"] == e for v in man.values()) for e in EMOTIONS} == expected[split]["per_class"]
        assert all(v["wrd"] for v in man.values())
        assert f"{split}: {expected[split]['total']} utterances" in out
    # the subset = the 240 kept utterances minus those without a transcript file
    kept = {u for s in ("train", "valid", "test") for u in _load(msp_manifests, s)}
    subset = {u for s in ("train", "valid", "test") for u in _load(tmp_path / "t", s)}
    assert subset == kept - set(mini_corpora.msp_counts["without_transcript"])
    msp.prepare_msp_podcast(mini_corpora.msp, tmp_path / "t2", splits=("test",), test_splits=["Test2"])
    assert len(_load(tmp_path / "t2", "test")) == mini_corpora.msp_counts["test2"] == 8
    assert not (tmp_path / "t2" / "train.json").exists()


def test_msp_skip_when_prepared(msp, mini_corpora, tmp_path, capsys):
    save = tmp_path / "s"
    msp.prepare_msp_podcast(mini_corpora.msp, save, check_audio=False)
    (save / "train.json").write_text("{}")  # marker: a skipped run leaves it alone
    msp.prepare_msp_podcast(mini_corpora.msp, save, check_audio=False)
    assert "skipping" in capsys.readouterr().out and _load(save, "train") == {}
    msp.prepare_msp_podcast(mini_corpora.msp, save, check_audio=False, transcript_only=True)  # options differ
    assert len(_load(save, "train")) == mini_corpora.msp_counts["manifest_transcript_only"]["train"]["total"]
    msp.prepare_msp_podcast(mini_corpora.msp, tmp_path / "never", skip_prep=True)
    assert not (tmp_path / "never").exists()


V111 = ('FileName,EmoDetail\n'
        'u1.wav,"WORKER00001; Angry; Frustrated,Annoyed; A:5.0; V:2.0; D:4.0;"\n'
        'u1.wav,WORKER00002; Angry; Annoyed; A:6.0; V:2.0; D:5.0;\n'
        'u1.wav,WORKER00003; Sad; ; A:3.0; V:2.0; D:3.0;\n'
        'u1.wav,WORKER00004; Other-Frustrated; Frustrated; A:5.0; V:2.0; D:4.0;\n'
        'u1.wav,WORKER00005; Happy; Amused; A:5.0; V:5.0; D:4.0;\n'
        'u2.wav,WORKER00001; Other-Bored; Bored; A:2.0; V:4.0; D:4.0;\n'
        'u2.wav,WORKER00002; Whatever; Bored; A:2.0; V:4.0; D:4.0;\n')
NEWER = ('FileName,WorkerID,EmoClass_Major,EmoClass_Second,EmoAct,EmoVal,EmoDom\n'
         'u1.wav,WORKER00001,Angry,"Frustrated,Annoyed",5.0,2.0,4.0\n'
         'u1.wav,WORKER00002,Angry,Annoyed,6.0,2.0,5.0\n'
         'u1.wav,WORKER00003,Sad,,3.0,2.0,3.0\n'
         'u1.wav,WORKER00004,Other-Frustrated,Frustrated,5.0,2.0,4.0\n'
         'u1.wav,WORKER00005,Happy,Amused,5.0,5.0,4.0\n'
         'u2.wav,WORKER00001,Other-Bored,Bored,2.0,4.0,4.0\n')


@pytest.mark.parametrize("detailed", [V111, NEWER], ids=["v1.11", "newer"])
def test_soft_label_hand_made(msp, tmp_path, detailed):
    root = _tiny_msp(tmp_path / "c", [("u1", "A", "Train"), ("u2", "N", "Train"), ("u3", "S", "Train")], detailed)
    msp.prepare_msp_podcast(root, tmp_path / "out", splits=("train",))
    man = _load(tmp_path / "out", "train")
    # u1: 2 Angry, 1 Sad, 1 Happy, 1 Other (ignored) -> Anger 2/4, Happiness 1/4, Sadness 1/4
    assert man["u1"]["emo_soft"] == [0.5, 0, 0, 0, 0.25, 0, 0.25, 0]
    # u2: only Other / unknown words; u3: no rows at all -> one-hot of the consensus class
    assert man["u2"]["emo_soft"] == [0, 0, 0, 0, 0, 1.0, 0, 0]
    assert man["u3"]["emo_soft"] == [0, 0, 0, 0, 0, 0, 1.0, 0]
    assert man["u1"]["duration"] == 0.5 and man["u1"]["spk_id"] == "7" and "wrd" not in man["u1"]


def _assert_fails(prepare, save, match, **kw):
    with pytest.raises(DataError, match=match):
        prepare(save_folder=save, **kw)
    assert not save.exists() or not list(save.glob("*.json")), "a manifest was left after a failure"


def test_msp_bad_inputs(msp, tmp_path):
    def case(name, rows, **kw):
        return _tiny_msp(tmp_path / name, rows, **kw)

    root = case("corrupt", [("good", "A", "Train"), ("bad_bytes", "H", "Train")])
    (root / "Audios" / "bad_bytes.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk")
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o1", "bad_bytes.wav", data_folder=root)

    root = case("zero", [("good", "A", "Train"), ("no_samples", "H", "Development")])
    _write_wav(root / "Audios" / "no_samples.wav", n=0)
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o2", "no_samples.wav.*0 samples", data_folder=root)

    root = case("sr", [("good", "A", "Train"), ("narrowband", "H", "Test1")])
    _write_wav(root / "Audios" / "narrowband.wav", sr=8000)
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o3", "narrowband.wav.*8000", data_folder=root)

    root = case("missing", [("good", "A", "Train"), ("gone", "H", "Train")])
    (root / "Audios" / "gone.wav").unlink()
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o4", "gone.wav", data_folder=root, check_audio=False)

    root = case("letter", [("good", "A", "Train"), ("zed", "Z", "Train")])
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o5", "'Z'.*zed.wav", data_folder=root, check_audio=False)

    root = case("trans", [("good", "A", "Train"), ("silent", "H", "Train")],
                transcripts={"good": "Hello there.", "silent": " ?! \n"})
    # A transcript empty after normalisation is left out of the ASR subset and listed (tests/test_ctc_text.py).
    msp.prepare_msp_podcast(root, tmp_path / "o6", transcript_only=True)
    assert list(_load(tmp_path / "o6", "train")) == ["good"]
    # Without transcript_only an empty transcript is just 'unknown'.
    msp.prepare_msp_podcast(root, tmp_path / "o7")
    man = _load(tmp_path / "o7", "train")
    assert man["good"]["wrd"] == "HELLO THERE" and "wrd" not in man["silent"]


def test_msp_cli(msp, tmp_path, capsys):
    root = _tiny_msp(tmp_path / "c", [("a", "A", "Train"), ("b", "Q", "Train")])
    with pytest.raises(SystemExit, match="b.wav"):
        msp.main(["--data_folder", str(root), "--save_folder", str(tmp_path / "o")])
    (root / "Labels" / "labels_consensus.csv").write_text(HEADER + "a.wav,A,3,4,4,7,Female,Train\n")
    msp.main(["--data_folder", str(root), "--save_folder", str(tmp_path / "o"), "--splits", "train"])
    assert list(_load(tmp_path / "o", "train")) == ["a"]


# ----------------------------------------------------------------------------------------------- LibriSpeech
def test_libri_counts_and_transcripts(mini_corpora, libri_manifests):
    counts = mini_corpora.libri_counts["splits"]
    assert sorted(p.name for p in libri_manifests.glob("*.json")) == [
        "dev-clean.json", "test-clean.json", "train-clean-100.json"]
    for split, n, n_spk in (("train-clean-100", 60, 8), ("dev-clean", 16, 4), ("test-clean", 16, 4)):
        man = _load(libri_manifests, split)
        assert len(man) == n == counts[split]["utterances"]
        assert len({v["spk_id"] for v in man.values()}) == n_spk == counts[split]["speakers"]
        ex = counts[split]["example"]
        assert man[ex["id"]]["wrd"] == ex["wrd"]
        for utt, item in man.items():
            assert item["spk_id"] == utt.split("-")[0]
            assert item["wav"].endswith(f"/{split}/{item['spk_id']}/{utt.split('-')[1]}/{utt}.flac")
            assert item["duration"] == pytest.approx(sf.info(item["wav"]).duration, abs=1e-4)
    # the transcript of one utterance, read from its trans.txt by hand
    utt = sorted(_load(libri_manifests, "dev-clean"))[0]
    spk, chap, _ = utt.split("-")
    line = [ln for ln in (mini_corpora.libri / "dev-clean" / spk / chap / f"{spk}-{chap}.trans.txt")
            .read_text().splitlines() if ln.startswith(utt + " ")][0]
    assert _load(libri_manifests, "dev-clean")[utt]["wrd"] == line.split(" ", 1)[1]


def test_libri_normalises_and_requires(libri, tmp_path):
    chap = tmp_path / "L" / "dev-clean" / "12" / "34"
    _write_wav(chap / "12-34-0000.flac")
    (chap / "12-34.trans.txt").write_text("12-34-0000 it's  a Test, ok?\n")
    libri.prepare_librispeech(tmp_path / "L", tmp_path / "o")
    assert _load(tmp_path / "o", "dev-clean")["12-34-0000"]["wrd"] == "IT'S A TEST OK"
    _assert_fails(lambda **kw: libri.prepare_librispeech(tmp_path / "L", required_splits=("test-other",), **kw),
                  tmp_path / "o2", "test-other")


def test_libri_bad_inputs(libri, mini_corpora, tmp_path):
    def broken(name):
        root = tmp_path / name
        shutil.copytree(mini_corpora.libri / "dev-clean", root / "dev-clean")
        chap = sorted((root / "dev-clean").glob("*/*"))[0]
        return root, chap, f"{chap.parent.name}-{chap.name}"

    root, chap, prefix = broken("untranscribed")
    trans = chap / f"{prefix}.trans.txt"
    trans.write_text("".join(ln + "\n" for ln in trans.read_text().splitlines() if not ln.startswith(prefix + "-0001")))
    _assert_fails(lambda **kw: libri.prepare_librispeech(root, **kw), tmp_path / "o1", f"{prefix}-0001.flac")

    root, chap, prefix = broken("no_audio")
    (chap / f"{prefix}-0000.flac").unlink()
    _assert_fails(lambda **kw: libri.prepare_librispeech(root, **kw), tmp_path / "o2",
                  f"{prefix}.trans.txt.*{prefix}-0000")

    root, chap, prefix = broken("corrupt")
    (chap / f"{prefix}-0001.flac").write_bytes(b"fLaC" + b"\x00" * 30)
    _assert_fails(lambda **kw: libri.prepare_librispeech(root, **kw), tmp_path / "o3", f"{prefix}-0001.flac")


# ----------------------------------------------------------------------------------------------- encodings
def test_cp1252_transcripts_are_decoded_and_listed(msp, libri, tmp_path, capsys):
    """Transcripts that are not UTF-8 are decoded as cp1252 (the text of "don’t", "café"), listed with file and
    line in <save_folder>/cp1252_fallback.txt and counted in the log; UTF-8 ones are not listed."""
    root = _tiny_msp(tmp_path / "c", [("u1", "A", "Train"), ("u2", "N", "Train")], transcripts={"u2": "Plain text."})
    (root / "Transcripts" / "u1.txt").write_bytes(b"I don\x92t like\r\nthe caf\xe9.\n")
    msp.prepare_msp_podcast(root, tmp_path / "o", splits=("train",))
    man = _load(tmp_path / "o", "train")
    assert man["u1"]["wrd"] == "I DON'T LIKE THE CAFE" and man["u2"]["wrd"] == "PLAIN TEXT"
    listed = tmp_path / "o" / "cp1252_fallback.txt"
    u1 = root / "Transcripts" / "u1.txt"
    assert listed.read_text(encoding="utf-8").splitlines() == ["file\tline", f"{u1}\t1", f"{u1}\t2"]
    assert f"2 line(s) in 1 file(s) were not UTF-8 and were decoded as cp1252; listed in {listed}" in \
        capsys.readouterr().out

    chap = tmp_path / "L" / "dev-clean" / "12" / "34"
    for i in range(3):
        _write_wav(chap / f"12-34-000{i}.flac", seed=i)
    (chap / "12-34.trans.txt").write_bytes(b"12-34-0000 CAF\xc9 AU LAIT\n12-34-0001 caf\xc3\xa9 au lait\n"
                                           b"12-34-0002 NA\xcfVE\n")
    libri.prepare_librispeech(tmp_path / "L", tmp_path / "lo")
    man = _load(tmp_path / "lo", "dev-clean")
    assert [man[f"12-34-000{i}"]["wrd"] for i in range(3)] == ["CAFE AU LAIT", "CAFE AU LAIT", "NAIVE"]
    assert (tmp_path / "lo" / "cp1252_fallback.txt").read_text().splitlines() == [
        "file\tline", f"{chap / '12-34.trans.txt'}\t1", f"{chap / '12-34.trans.txt'}\t3"]


def test_label_csv_that_is_not_utf8_names_file_and_line(msp, tmp_path):
    root = _tiny_msp(tmp_path / "c", [("u1", "A", "Train"), ("u2", "N", "Train"), ("u3", "S", "Train")])
    labels = root / "Labels" / "labels_consensus.csv"
    labels.write_bytes(labels.read_bytes().replace(b",7,Female,", b",7,F\xe9male,").replace(b"\xe9", b"e", 2))
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o", re.escape(f"{labels}:4: not UTF-8"), data_folder=root)
    labels.write_bytes(labels.read_bytes().replace(b"\xe9", b"e"))
    (root / "Labels" / "labels_detailed.csv").write_bytes(V111.encode().replace(b"Amused", b"Amus\xe9"))
    detailed = root / "Labels" / "labels_detailed.csv"
    _assert_fails(msp.prepare_msp_podcast, tmp_path / "o", re.escape(f"{detailed}:6: not UTF-8"), data_folder=root)


def test_prepare_from_hparams_writes_what_the_prepare_functions_write(msp, libri, mini_corpora, msp_manifests,
                                                                       libri_manifests, tmp_path):
    """A recipe's stage 0 (train.py calls prepare_from_hparams) gives the manifests of the prepare functions,
    byte for byte, where msp_manifests / librispeech_manifests say; skip_prep writes nothing; a key missing
    from the YAML is named."""
    h = {"skip_prep": False, "data_folder": str(mini_corpora.msp), "prep_folder": str(tmp_path / "m"),
         "transcript_only": False, "test_splits": ["Test1"]}
    msp.prepare_from_hparams(h)
    assert sorted(msp.msp_manifests(h)) == ["test", "train", "valid"]
    for split, path in msp.msp_manifests(h).items():
        assert Path(path).read_bytes() == (msp_manifests / f"{split}.json").read_bytes()
    with pytest.raises(KeyError, match="test_splits"):
        msp.prepare_from_hparams({k: v for k, v in h.items() if k != "test_splits"})
    h = {"skip_prep": False, "data_folder": str(mini_corpora.libri), "prep_folder": str(tmp_path / "l"),
         "train_split": "train-clean-100", "valid_split": "dev-clean", "test_split": "test-clean"}
    libri.prepare_from_hparams(h)
    paths = libri.librispeech_manifests(h)
    assert {k: Path(v).name for k, v in paths.items()} == {
        "train": "train-clean-100.json", "valid": "dev-clean.json", "test": "test-clean.json"}
    for path in paths.values():
        assert Path(path).read_bytes() == (libri_manifests / Path(path).name).read_bytes()
    _assert_fails(lambda **kw: libri.prepare_from_hparams({**h, "prep_folder": str(kw["save_folder"]),
                                                           "test_split": "test-other"}),
                  tmp_path / "l2", "required LibriSpeech split test-other not found")
    msp.prepare_from_hparams({**h, "skip_prep": True, "prep_folder": str(tmp_path / "never")})
    libri.prepare_from_hparams({**h, "skip_prep": True, "prep_folder": str(tmp_path / "never")})
    assert not (tmp_path / "never").exists()
