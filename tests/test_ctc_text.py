"""Real-transcript normalisation (numbers, accents, brackets), the ASR-subset exclusion in the prepare scripts,
and WER with Whisper's English normaliser."""
import json

import numpy as np
import pytest
import soundfile as sf

from lobes import ctc_text
from lobes import metrics as M
from lobes.ctc_text import normalize_transcript
from lobes.errors import DataError

MSP = "recipes/MSP-Podcast/msp_podcast_prepare.py"
LIBRI = "recipes/LibriSpeech/librispeech_prepare.py"


@pytest.mark.parametrize("raw, expected", [
    # numbers
    ("I was born in 1990", "I WAS BORN IN NINETEEN NINETY"),
    ("2020", "TWENTY TWENTY"),
    ("in 2005.", "IN TWO THOUSAND AND FIVE"),
    ("the 3rd time, the 21st-century", "THE THIRD TIME THE TWENTY FIRST CENTURY"),
    ("It is 3.10 now", "IT IS THREE POINT ONE ZERO NOW"),
    ("50% of 1,000,000 people", "FIFTY PERCENT OF ONE MILLION PEOPLE"),
    ("3.5 %", "THREE POINT FIVE PERCENT"),
    ("He paid $5 and £20", "HE PAID FIVE DOLLARS AND TWENTY POUNDS"),
    ("the 1990s and the '80s", "THE NINETEEN NINETIES AND THE EIGHTIES"),
    ("agent 007 has 42 cats", "AGENT ZERO ZERO SEVEN HAS FORTY TWO CATS"),
    ("mp3 at 3:30", "MP THREE AT THREE THIRTY"),
    ("Ｎｏ．１２", "NO TWELVE"),  # full-width forms fold through NFKD
    # Unicode
    ("café", "CAFE"),
    ("Crème brûlée, naïve Zoë", "CREME BRULEE NAIVE ZOE"),
    ("Straße, Ærø, Łódź", "STRASSE AERO LODZ"),
    ("I’m fine — really", "I'M FINE REALLY"),
    ("日本 ok", "OK"),
    # brackets and apostrophes
    ("[laughter] yeah (noise) <unk> ok {breath}", "YEAH OK"),
    ("so [LAUGHTER] it's fine [BREATHING]", "SO IT'S FINE"),
    ("don't say 'hello' rock & roll", "DON'T SAY HELLO ROCK AND ROLL"),
    ("[laughter]", ""),
    ("  ?! \n", ""),
])
def test_normalize_transcript(raw, expected):
    assert normalize_transcript(raw) == expected


def test_normalized_text_is_in_the_ctc_alphabet():
    nasty = "Ünïcødé ½ ² 10⁵ “quoted” ‘x’ #1 @home 1.2.3 99.9% ~~ 12345678901234567890 $3.50 ½ [a] (b) <c>"
    out = normalize_transcript(nasty)
    assert set(out) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    assert "  " not in out and out == out.strip()
    assert ctc_text.decode_indices(ctc_text.encode(out).tolist()) == out


# -------------------------------------------------------------------------------------- prepare: ASR subset
HEADER = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"


def _wav(path, seconds=0.5):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).uniform(-0.3, 0.3, int(16000 * seconds)).astype(np.float32)
    sf.write(str(path), x, 16000, subtype="PCM_16")


def _msp_corpus(root, transcripts):
    (root / "Labels").mkdir(parents=True)
    (root / "Labels" / "labels_consensus.csv").write_text(
        HEADER + "".join(f"{s}.wav,A,3.0,4.0,4.0,7,Female,Train\n" for s in transcripts))
    (root / "Transcripts").mkdir()
    for stem, text in transcripts.items():
        _wav(root / "Audios" / f"{stem}.wav")
        (root / "Transcripts" / f"{stem}.txt").write_text(text, encoding="utf-8")
    return root


TRANSCRIPTS = {"digits": "2020\n", "laugh": "[laughter]\n", "cafe": "Café at 9?\n", "dots": "...\n"}


@pytest.mark.parametrize("transcript_only", [True, False])
def test_msp_prepare_spells_digits_and_lists_empty_transcripts(load_recipe, tmp_path, capsys, transcript_only):
    prep = load_recipe(MSP)
    root = _msp_corpus(tmp_path / "c", TRANSCRIPTS)
    out = tmp_path / "o"
    prep.prepare_msp_podcast(root, out, splits=("train",), transcript_only=transcript_only)
    man = json.loads((out / "train.json").read_text())
    assert man["digits"]["wrd"] == "TWENTY TWENTY"
    assert man["cafe"]["wrd"] == "CAFE AT NINE"
    if transcript_only:  # the ASR subset: the two empty ones are left out
        assert sorted(man) == ["cafe", "digits"]
    else:  # SER keeps them, without a transcript
        assert sorted(man) == ["cafe", "digits", "dots", "laugh"]
        assert "wrd" not in man["laugh"] and "wrd" not in man["dots"]
    lines = (out / "excluded_transcripts.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id\treason"
    rows = dict(line.split("\t", 1) for line in lines[1:])
    assert sorted(rows) == ["dots", "laugh"]
    assert rows["laugh"] == "transcript empty after normalisation (raw: '[laughter]')"
    assert "2 utterance(s) whose transcript is empty after normalisation" in capsys.readouterr().out


def test_libri_prepare_leaves_out_empty_transcripts(load_recipe, tmp_path):
    prep = load_recipe(LIBRI)
    chap = tmp_path / "c" / "dev-clean" / "19" / "198"
    texts = {"19-198-0000": "CHAPTER 1990", "19-198-0001": "[NOISE]", "19-198-0002": "HELLO"}
    for utt in texts:
        chap.mkdir(parents=True, exist_ok=True)
        x = np.zeros(8000, dtype=np.float32)
        sf.write(str(chap / f"{utt}.flac"), x, 16000, subtype="PCM_16")
    (chap / "19-198.trans.txt").write_text("".join(f"{u} {t}\n" for u, t in texts.items()))
    prep.prepare_librispeech(tmp_path / "c", tmp_path / "o", splits=("dev-clean",))
    man = json.loads((tmp_path / "o" / "dev-clean.json").read_text())
    assert {u: e["wrd"] for u, e in man.items()} == {"19-198-0000": "CHAPTER NINETEEN NINETY",
                                                     "19-198-0002": "HELLO"}
    lines = (tmp_path / "o" / "excluded_transcripts.txt").read_text().splitlines()
    assert lines == ["id\treason", "19-198-0001\ttranscript empty after normalisation (raw: '[NOISE]')"]


# ------------------------------------------------------------------------------------------------------ WER
def test_wer_whisper_norm_vs_ctc_norm(tmp_path):
    refs = ["Mr. Smith's colour is red.", "I was born in 1990."]
    hyps = ["MISTER SMITH'S COLOR IS RED", "I WAS BORN IN NINETEEN NINETY"]
    # CTC-normalised: MR/MISTER and COLOUR/COLOR differ -> 2 substitutions over 5 + 6 reference words
    ctc_refs, ctc_hyps = [normalize_transcript(t) for t in refs], [normalize_transcript(t) for t in hyps]
    assert M.wer(ctc_refs, ctc_hyps) == pytest.approx(2 / 11)
    # Whisper: "mister smith is colour is red" / "i was born in 1990"; empty spelling map -> colour != color
    d = M.wer_whisper_norm_details(refs, hyps)
    assert (d["substitutions"], d["n_ref_words"]) == (1, 11)
    assert M.wer_whisper_norm(refs, hyps) == pytest.approx(1 / 11)
    assert M.wer_whisper_norm(refs, hyps, spelling_mapping={"colour": "color"}) == 0.0
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"colour": "color"}))
    assert M.wer_whisper_norm(refs, hyps, spelling_mapping=path) == 0.0
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="normalizer.json"):
        M.wer_whisper_norm(refs, hyps, spelling_mapping=path)
    with pytest.raises(DataError, match="2 transcripts but hyps has 1"):
        M.wer_whisper_norm(refs, hyps[:1])
