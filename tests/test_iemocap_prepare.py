"""IEMOCAP prepare on the mini IEMOCAP (recipes/IEMOCAP/make_mini_iemocap.py): counts per session and class,
exc -> hap merge, soft labels from evaluator lines, leave-one-session-out folds, transcripts, bad input."""
import json
import re
import shutil

import pytest

from lobes.errors import DataError

PREP = "recipes/IEMOCAP/iemocap_prepare.py"
GEN = "recipes/IEMOCAP/make_mini_iemocap.py"
FOUR = ["neu", "hap", "ang", "sad"]
PER_SESSION = {"neu": 3, "hap": 3, "ang": 2, "sad": 2}  # fixed by make_mini_iemocap.SESSION_CODES, any seed


@pytest.fixture(scope="module")
def prep(load_recipe):
    return load_recipe(PREP)


def _load(folder, fold, split):
    return json.loads((folder / f"fold{fold}" / f"{split}.json").read_text(encoding="utf-8"))


def _copy(mini_iemocap, tmp_path, name="c"):
    dst = tmp_path / name / "IEMOCAP_full_release"
    shutil.copytree(mini_iemocap.root, dst)
    return dst


def test_counts_per_session_and_class(mini_iemocap, iemocap_manifests):
    assert (iemocap_manifests / "classes.txt").read_text().split() == FOUR
    assert mini_iemocap.counts["per_session"] == {str(s): PER_SESSION for s in range(1, 6)}
    assert mini_iemocap.counts["total_4class"] == 50 and mini_iemocap.counts["utterances"] == 60
    seen = {}
    for k in range(1, 6):
        test = _load(iemocap_manifests, k, "test")  # fold k tests on Session k: its counts are session k's
        assert {e["session"] for e in test.values()} == {k}
        assert {c: sum(e["emo"] == c for e in test.values()) for c in FOUR} == PER_SESSION
        splits = [_load(iemocap_manifests, k, s) for s in ("train", "valid", "test")]
        assert sum(len(m) for m in splits) == 50
        for m in splits:
            for utt, e in m.items():
                assert seen.setdefault(utt, e) == e  # same entry in every fold
    assert len(seen) == 50


def test_log_prints_counts_per_session(prep, mini_iemocap, tmp_path, capsys):
    prep.prepare_iemocap(mini_iemocap.root, tmp_path / "o", folds=(2,))
    out = capsys.readouterr().out
    assert "50 utterances in classes ['neu', 'hap', 'ang', 'sad'] (full corpus: 5531)" in out
    assert "        3      3     3     2     2      10" in out
    assert "  all         15    15    10    10      50" in out
    n_valid = mini_iemocap.counts["per_speaker_4class"]["Ses03_F"]  # fold 2 validates on Session 3's F speaker
    assert f"fold2 (test Session2): train {40 - n_valid}, valid {n_valid}, test 10" in out


def test_exc_merged_into_hap_and_fru_xxx_dropped(iemocap_manifests, mini_iemocap):
    entries = {}
    for s in ("train", "valid", "test"):
        entries.update(_load(iemocap_manifests, 1, s))
    orig = {c: sum(e["emo_orig"] == c for e in entries.values()) for c in ("hap", "exc", "fru", "xxx")}
    assert orig == {"hap": 5, "exc": 10, "fru": 0, "xxx": 0}
    assert all(e["emo"] == "hap" for e in entries.values() if e["emo_orig"] == "exc")
    assert mini_iemocap.counts["codes"]["exc"] == 10 and mini_iemocap.counts["codes"]["fru"] == 5
    # The ASR manifests keep every evaluated utterance with a usable transcript (fru and xxx too).
    asr = {}
    for s in ("asr_train", "asr_valid", "asr_test"):
        asr.update(_load(iemocap_manifests, 1, s))
    assert len(asr) == 60 - len(mini_iemocap.counts["empty_transcripts"]) == 59
    assert {e["emo_orig"] for e in asr.values()} == {"neu", "hap", "exc", "ang", "sad", "fru", "xxx"}
    assert all("emo" not in e and e["wrd"] for e in asr.values())


def test_transcripts_normalised_and_empty_ones_listed(iemocap_manifests, mini_iemocap):
    entries = {}
    for s in ("asr_train", "asr_valid", "asr_test"):
        entries.update(_load(iemocap_manifests, 1, s))
    for utt, wrd in mini_iemocap.counts["digits_transcript"].items():
        assert entries[utt]["wrd"] == wrd == "I WAS BORN IN NINETEEN NINETY"
    assert not any("LAUGHTER" in e["wrd"] or "[" in e["wrd"] for e in entries.values())
    (empty,) = mini_iemocap.counts["empty_transcripts"]
    assert empty not in entries
    lines = (iemocap_manifests / "excluded_transcripts.txt").read_text().splitlines()
    assert lines == ["id\treason", f"{empty}\ttranscript empty after normalisation (raw: '[BREATHING]')"]


@pytest.mark.parametrize("valid_gender", ["F", "M"])
def test_folds_are_speaker_disjoint(prep, mini_iemocap, iemocap_manifests, tmp_path, valid_gender):
    out = iemocap_manifests
    if valid_gender == "M":
        out = tmp_path / "m"
        prep.prepare_iemocap(mini_iemocap.root, out, valid_gender="M")
    all_spk = set(mini_iemocap.counts["speakers"])
    assert len(all_spk) == 10
    for k in range(1, 6):
        for prefix in ("", "asr_"):
            spk = {s: {e["spk_id"] for e in _load(out, k, prefix + s).values()} for s in ("train", "valid", "test")}
            assert spk["test"] == {f"Ses{k:02d}_F", f"Ses{k:02d}_M"}
            assert spk["valid"] == {f"Ses{k % 5 + 1:02d}_{valid_gender}"}
            assert spk["train"] == all_spk - spk["test"] - spk["valid"] and len(spk["train"]) == 7
        sizes = {s: len(_load(out, k, s)) for s in ("train", "valid", "test")}
        per_spk = mini_iemocap.counts["per_speaker_4class"]
        assert sizes["valid"] == per_spk[f"Ses{k % 5 + 1:02d}_{valid_gender}"] and sizes["test"] == 10
        assert sizes["train"] == 50 - 10 - sizes["valid"]


SOFT_DIALOG = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[1.0000 - 2.0000]\tSes01F_impro01_F000\texc\t[3.5000, 4.0000, 3.0000]
C-E1:\tExcited;\t()
C-E2:\tHappiness; Excited;\t()
C-E3:\tFrustration;\t()
C-F1:\tNeutral state;\t(self)
A-E1:\tval 4; act 4; dom  3;\t()

[3.0000 - 4.0000]\tSes01F_impro01_M000\tang\t[1.5000, 4.0000, 4.0000]
C-E1:\tAnger; Frustration;\t()
C-E2:\tAnger; Sadness;\t()
C-E4:\tSadness;\t()
C-M1:\tAnger;\t()

[5.0000 - 6.0000]\tSes01F_impro01_F001\tneu\t[3.0000, 2.5000, 3.0000]
C-E1:\tFrustration;\t()
C-E2:\tOther;\t(bored)
C-E3:\tBoredom;\t()

[7.0000 - 8.0000]\tSes01F_impro01_M001\tfru\t[2.0000, 3.5000, 3.5000]
C-E1:\tFrustration;\t()
C-E2:\tAnger;\t()
"""


def test_soft_labels_from_evaluator_lines(prep, mini_iemocap, tmp_path, capsys):
    root = _copy(mini_iemocap, tmp_path)
    (root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt").write_text(SOFT_DIALOG)
    prep.prepare_iemocap(root, tmp_path / "o4", folds=(1,))
    assert "not recognised (ignored, like 'Other'): {'boredom': 1}" in capsys.readouterr().out
    test = _load(tmp_path / "o4", 1, "test")
    # F000: E1 hap 1, E2 (hap + exc) = hap 1, E3 frustration ignored, F1 neutral 1 -> neu 1/3, hap 2/3
    assert test["Ses01F_impro01_F000"]["emo"] == "hap"
    assert test["Ses01F_impro01_F000"]["emo_soft"] == pytest.approx([1 / 3, 2 / 3, 0, 0])
    assert test["Ses01F_impro01_F000"]["vad"] == [3.5, 4.0, 3.0]
    # M000: E1 ang 1/2 (fru half ignored), E2 ang 1/2 + sad 1/2, E4 sad 1, M1 ang 1 -> ang 2 : sad 1.5
    assert test["Ses01F_impro01_M000"]["emo_soft"] == pytest.approx([0, 0, 4 / 7, 3 / 7])
    # F001: no vote maps to a class (Frustration, Other, unknown Boredom) -> one-hot of the consensus;
    # M001 (fru) is not an SER utterance
    assert test["Ses01F_impro01_F001"]["emo_soft"] == [1.0, 0.0, 0.0, 0.0]
    assert "Ses01F_impro01_M001" not in test
    assert "Ses01F_impro01_M001" in _load(tmp_path / "o4", 1, "asr_test")

    # A 5-class map (frustration kept): classes in first-appearance order, fru votes count.
    five = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad", "fru": "fru"}
    prep.prepare_iemocap(root, tmp_path / "o5", class_map=five, folds=(1,))
    assert (tmp_path / "o5" / "classes.txt").read_text().split() == FOUR + ["fru"]
    test = _load(tmp_path / "o5", 1, "test")
    assert test["Ses01F_impro01_F000"]["emo_soft"] == pytest.approx([1 / 4, 2 / 4, 0, 0, 1 / 4])
    assert test["Ses01F_impro01_M001"]["emo_soft"] == pytest.approx([0, 0, 1 / 2, 0, 1 / 2])
    assert test["Ses01F_impro01_F001"]["emo_soft"] == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_class_map_is_configurable(prep, mini_iemocap, tmp_path):
    cmap = {"neu": "neutral", "exc": "excited", "hap": "happy", "fru": "frustrated"}
    prep.prepare_iemocap(mini_iemocap.root, tmp_path / "o", class_map=cmap, folds=(3,), asr_manifests=False)
    assert (tmp_path / "o" / "classes.txt").read_text().split() == ["neutral", "excited", "happy", "frustrated"]
    entries = {}
    for s in ("train", "valid", "test"):
        entries.update(_load(tmp_path / "o", 3, s))
    counts = {c: sum(e["emo"] == c for e in entries.values()) for c in ("neutral", "excited", "happy", "frustrated")}
    assert counts == {"neutral": 15, "excited": 10, "happy": 5, "frustrated": 5}
    assert all(len(e["emo_soft"]) == 4 for e in entries.values())
    assert not (tmp_path / "o" / "fold3" / "asr_train.json").exists()
    with pytest.raises(DataError, match=r"unknown IEMOCAP code\(s\) \['happiness'\]"):
        prep.prepare_iemocap(mini_iemocap.root, tmp_path / "x", class_map={"happiness": "hap"})


def _assert_fails(prep, root, save, match):
    with pytest.raises(DataError, match=match):
        prep.prepare_iemocap(root, save)
    assert not save.exists() or not list(save.rglob("*.json")), "a manifest was left after a failure"


def test_bad_files_are_named(prep, mini_iemocap, tmp_path):
    emo = "Session2/dialog/EmoEvaluation/Ses02M_script01_1.txt"
    root = _copy(mini_iemocap, tmp_path, "code")
    path = root / emo
    path.write_text(path.read_text().replace("\tsad\t", "\tsadd\t", 1))
    _assert_fails(prep, root, tmp_path / "o1", r"Ses02M_script01_1.txt:\d+: unknown category 'sadd'")

    root = _copy(mini_iemocap, tmp_path, "line")
    path = root / emo
    path.write_text(re.sub(r"(\d) - (\d)", r"\1 to \2", path.read_text(), count=1))
    _assert_fails(prep, root, tmp_path / "o2", r"Ses02M_script01_1.txt:3: cannot parse consensus line")

    root = _copy(mini_iemocap, tmp_path, "wav")
    wav = min((root / "Session4" / "sentences" / "wav" / "Ses04F_impro01").glob("*.wav"))
    wav.unlink()
    _assert_fails(prep, root, tmp_path / "o3", f"audio file .*{wav.name} of {wav.stem} not found")

    root = _copy(mini_iemocap, tmp_path, "corrupt")
    wav = min((root / "Session5" / "sentences" / "wav" / "Ses05M_script01_1").glob("*.wav"))
    wav.write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk")
    _assert_fails(prep, root, tmp_path / "o4", f"{wav.name}: unreadable or corrupt audio")

    root = _copy(mini_iemocap, tmp_path, "nosession")
    shutil.rmtree(root / "Session3")
    _assert_fails(prep, root, tmp_path / "o5", "Session3/dialog/EmoEvaluation: no EmoEvaluation")

    with pytest.raises(SystemExit, match="--class_map is not valid JSON"):
        prep.main(["--data_folder", str(mini_iemocap.root), "--save_folder", str(tmp_path / "o6"),
                   "--class_map", "{neu: neu}"])


def test_generator_is_deterministic(load_recipe, mini_iemocap, tmp_path):
    gen = load_recipe(GEN)
    counts = gen.make_mini_iemocap(tmp_path / "again", seed=mini_iemocap.seed, workers=2)
    assert counts == mini_iemocap.counts
    files = sorted(p.relative_to(mini_iemocap.root) for p in mini_iemocap.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".wav"]) == 60
    for f in files:
        assert (mini_iemocap.root / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    other = gen.plan(mini_iemocap.seed + 1)
    assert [u["code"] for u in other] != [u["code"] for u in gen.plan(mini_iemocap.seed)]


def test_rerun_is_skipped_only_with_the_same_options(prep, mini_iemocap, tmp_path, capsys):
    out = tmp_path / "o"
    prep.prepare_iemocap(mini_iemocap.root, out, folds=(1,), asr_manifests=False)
    prep.prepare_iemocap(mini_iemocap.root, out, folds=(1,), asr_manifests=False)
    assert capsys.readouterr().out.count("already prepared with the same options; skipping") == 1
    prep.prepare_iemocap(mini_iemocap.root, out, folds=(1,), asr_manifests=False, valid_gender="M")
    assert "skipping" not in capsys.readouterr().out
    assert {e["spk_id"] for e in _load(out, 1, "valid").values()} == {"Ses02_M"}


def test_latin1_bytes_are_decoded_as_cp1252_listed_and_counted(prep, mini_iemocap, tmp_path, capsys):
    """A transcription saved in Latin-1 ("caf\\xe9") gives the text the normaliser gives for "café" (not "CAF",
    what errors="replace" made of it); every such line is listed (file, line) and counted in the log."""
    from lobes.ctc_text import normalize_transcript

    root = _copy(mini_iemocap, tmp_path)
    trans = root / "Session1" / "dialog" / "transcriptions" / "Ses01F_impro01.txt"
    lines = trans.read_bytes().split(b"\n")
    assert lines[1].startswith(b"Ses01F_impro01_F000 [")
    lines[1] = lines[1].split(b"]: ")[0] + b"]: I like the caf\xe9."
    trans.write_bytes(b"\n".join(lines))
    emo = root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    emo.write_bytes(emo.read_bytes().replace(b"C-E1:\tAnger;\t()", b"C-E1:\tAnger;\t(d\xe9j\xe0 vu)", 1))
    prep.prepare_iemocap(root, tmp_path / "o", folds=(1,))
    wrd = _load(tmp_path / "o", 1, "asr_test")["Ses01F_impro01_F000"]["wrd"]
    assert wrd == normalize_transcript("I like the café.") == "I LIKE THE CAFE"
    emo_line = emo.read_bytes().split(b"\n").index(b"C-E1:\tAnger;\t(d\xe9j\xe0 vu)") + 1
    listed = (tmp_path / "o" / "cp1252_fallback.txt").read_text(encoding="utf-8").splitlines()
    assert listed == ["file\tline", f"{trans}\t2", f"{emo}\t{emo_line}"]  # transcriptions are read first
    assert ("2 line(s) in 2 file(s) were not UTF-8 and were decoded as cp1252; listed in "
            f"{tmp_path / 'o' / 'cp1252_fallback.txt'}") in capsys.readouterr().out
    # The clean corpus lists nothing (the list is still written, so a stale one never survives).
    assert (iemocap_manifests_folder(prep, mini_iemocap, tmp_path) / "cp1252_fallback.txt").read_text() == "file\tline\n"

    # A byte that cp1252 leaves undefined is neither: DataError naming file and line, nothing written.
    trans.write_bytes(trans.read_bytes().replace(b"caf\xe9", b"caf\x81"))
    _assert_fails(prep, root, tmp_path / "bad", rf"{re.escape(str(trans))}:2: neither UTF-8 .* nor cp1252")


def iemocap_manifests_folder(prep, mini_iemocap, tmp_path):
    out = tmp_path / "clean"
    prep.prepare_iemocap(mini_iemocap.root, out, folds=(1,), asr_manifests=False)
    return out


# ------------------------------------------------------------------------------------------ split protocols
SPLITS = ("train", "valid", "test")


def test_sessions_fold_list_is_written(iemocap_manifests):
    lines = (iemocap_manifests / "folds.tsv").read_text().splitlines()
    assert lines[0] == "fold\tsplit\tspeakers\tser_utterances\tasr_utterances" and len(lines) == 1 + 5 * 3
    train_spk = " ".join(f"Ses{s:02d}_{g}" for s in range(2, 6) for g in "FM" if (s, g) != (2, "F"))
    assert lines[1:4] == [f"1\ttrain\t{train_spk}\t35\t41", "1\tvalid\tSes02_F\t5\t6",
                          "1\ttest\tSes01_F Ses01_M\t10\t12"]


def test_speakers_protocol_leaves_one_speaker_out_as_speechbrain(prep, mini_iemocap, tmp_path):
    """SpeechBrain's different_speakers split: test_spk_id k (Session s: F = 2s - 1, M = 2s), validation = the
    other speaker of that session, training = the other 8 speakers."""
    out = tmp_path / "spk"
    paths = prep.prepare_iemocap(mini_iemocap.root, out, split_protocol="speakers")
    assert sorted(paths) == list(range(1, 11))
    per_spk = mini_iemocap.counts["per_speaker_4class"]
    assert sum(per_spk.values()) == 50
    order = ["Ses01_F", "Ses01_M", "Ses02_F", "Ses02_M", "Ses03_F", "Ses03_M", "Ses04_F", "Ses04_M", "Ses05_F",
             "Ses05_M"]
    rows = (out / "folds.tsv").read_text().splitlines()[1:]
    assert len(rows) == 30
    for k in range(1, 11):
        test_spk, valid_spk = order[k - 1], order[k if k % 2 else k - 2]
        for prefix in ("", "asr_"):
            spk = {s: {e["spk_id"] for e in _load(out, k, prefix + s).values()} for s in SPLITS}
            assert spk == {"test": {test_spk}, "valid": {valid_spk}, "train": set(order) - {test_spk, valid_spk}}
        sizes = {s: len(_load(out, k, s)) for s in SPLITS}
        assert sizes == {"test": per_spk[test_spk], "valid": per_spk[valid_spk],
                         "train": 50 - per_spk[test_spk] - per_spk[valid_spk]}
        asr = {s: len(_load(out, k, "asr_" + s)) for s in SPLITS}
        assert rows[3 * (k - 1) + 2] == f"{k}\ttest\t{test_spk}\t{sizes['test']}\t{asr['test']}"
        assert rows[3 * (k - 1) + 1] == f"{k}\tvalid\t{valid_spk}\t{sizes['valid']}\t{asr['valid']}"


def test_random_protocol_is_an_80_10_10_split_of_the_seed(prep, mini_iemocap, tmp_path):
    import random

    out = tmp_path / "rnd"
    assert sorted(prep.prepare_iemocap(mini_iemocap.root, out, split_protocol="random", split_seed=12)) == [1]
    ser = {s: _load(out, 1, s) for s in SPLITS}
    assert {s: len(m) for s, m in ser.items()} == {"train": 40, "valid": 5, "test": 5}  # int(50*.8), int(50*.1)
    ids = sorted(u for m in ser.values() for u in m)
    assert len(ids) == len(set(ids)) == 50
    rng = random.Random(12)
    rng.shuffle(ids)  # SpeechBrain's split_sets arithmetic on the sorted ids
    assert (set(ids[:40]), set(ids[40:45]), set(ids[45:])) == tuple(set(ser[s]) for s in SPLITS)
    assert len({e["spk_id"] for e in ser["train"].values()}) == 10  # speakers shared across splits
    # then the 10 fru / xxx utterances (ASR only), same generator: 8 / 1 / 1 (those with a transcript listed)
    asr = {s: _load(out, 1, "asr_" + s) for s in SPLITS}
    others = sorted(u for m in asr.values() for u, e in m.items() if e["emo_orig"] in ("fru", "xxx"))
    others = sorted(set(others) | set(mini_iemocap.counts["empty_transcripts"]) - set(ids))
    assert len(others) == 10
    rng.shuffle(others)
    for s, part in zip(SPLITS, (others[:8], others[8:9], others[9:])):
        assert set(asr[s]) == {u for u in ser[s] if "wrd" in ser[s][u]} | (
            set(part) - set(mini_iemocap.counts["empty_transcripts"]))
    other = tmp_path / "rnd13"
    prep.prepare_iemocap(mini_iemocap.root, other, split_protocol="random", split_seed=13)
    assert set(_load(other, 1, "test")) != set(ser["test"])
    prep.prepare_iemocap(mini_iemocap.root, tmp_path / "rnd12", split_protocol="random", split_seed=12)
    assert (tmp_path / "rnd12" / "fold1" / "test.json").read_bytes() == (out / "fold1" / "test.json").read_bytes()


def test_fold_and_protocol_are_checked(prep, mini_iemocap, tmp_path):
    with pytest.raises(DataError, match=r"folds of split_protocol 'sessions' are \[1, 2, 3, 4, 5\], got \[6\]"):
        prep.prepare_iemocap(mini_iemocap.root, tmp_path / "x", folds=(6,))
    with pytest.raises(DataError, match="split_protocol must be one of"):
        prep.prepare_iemocap(mini_iemocap.root, tmp_path / "x", split_protocol="dialogs")
    out = tmp_path / "spk"
    prep.prepare_iemocap(mini_iemocap.root, out, split_protocol="speakers", folds=(7,), asr_manifests=False)
    hp = {"prep_folder": str(out), "fold": 7, "split_protocol": "speakers"}
    assert prep.iemocap_manifests(hp)["test"] == str(out / "fold7" / "test.json")
    with pytest.raises(DataError, match="fold 7 is not a fold of split_protocol 'sessions'"):
        prep.iemocap_manifests({**hp, "split_protocol": "sessions"})
    with pytest.raises(DataError, match="prepared with split_protocol 'speakers', the recipe asks for 'random'"):
        prep.iemocap_manifests({**hp, "fold": 1, "split_protocol": "random"})
