"""Coming from SpeechBrain: its IEMOCAP manifests (``{utt: {"wav", "length", "emo"}}``, written as its
iemocap_prepare.create_json writes them) are read by our SER data loading (lobes/dataio.py) and trained on by the
IEMOCAP SER recipe through SpeechBrain's own option names (train_annotation, ...)."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lobes.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
MSP_NAMES = ["Anger", "Happiness", "Neutral", "Sadness"]  # another order and other names than SpeechBrain's labels
TO_MSP = {"neu": "Neutral", "hap": "Happiness", "ang": "Anger", "sad": "Sadness"}


def write_sb_manifest(ours, path, data_root=None):
    """A SpeechBrain-format manifest of the utterances of one of our manifests: wav, length (s), emo only."""
    out = {}
    for utt, e in ours.items():
        wav = e["wav"] if data_root is None else e["wav"].replace(str(data_root), "{data_root}")
        out[utt] = {"wav": wav, "length": e["duration"], "emo": e["emo"]}
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sb_fold1(iemocap_manifests, mini_iemocap, tmp_path_factory):
    """Fold 1's train / valid / test as SpeechBrain-format manifests (wav paths with SpeechBrain's {data_root})."""
    folder = tmp_path_factory.mktemp("sb_manifests")
    ours = {s: json.loads((iemocap_manifests / "fold1" / f"{s}.json").read_text()) for s in ("train", "valid", "test")}
    paths = {s: write_sb_manifest(m, folder / f"{s}.json", mini_iemocap.root) for s, m in ours.items()}
    return {"paths": paths, "ours": ours}


def test_speechbrain_entries_get_one_hot_soft_labels_durations_and_mapped_classes(sb_fold1, mini_iemocap):
    from lobes.dataio import SPEECHBRAIN_TO_MSP, class_counts, ser_datasets

    assert SPEECHBRAIN_TO_MSP == TO_MSP
    ours = sb_fold1["ours"]["test"]
    ds = ser_datasets({"test": sb_fold1["paths"]["test"]}, MSP_NAMES, label_map=TO_MSP,
                      data_root=mini_iemocap.root)["test"]
    assert len(ds) == len(ours) == 10
    for i in range(len(ds)):
        item = ds[i]
        e = ours[item["id"]]
        assert MSP_NAMES[int(item["emo_idx"])] == TO_MSP[e["emo"]]
        assert item["soft_label"].tolist() == [float(c == TO_MSP[e["emo"]]) for c in MSP_NAMES]
        assert item["spk_id"] == item["id"]  # unknown speaker: each utterance its own
        assert abs(len(item["sig"]) / 16000 - e["duration"]) < 1e-4  # {data_root} replaced: the wav was read
    # Session 1 (test): neu 3, hap 3, ang 2, sad 2 -> in MSP_NAMES order
    assert class_counts(sb_fold1["paths"]["test"], MSP_NAMES, label_map=TO_MSP, data_root=mini_iemocap.root) \
        == [2, 3, 3, 2]
    # SpeechBrain's labels are the IEMOCAP recipe's classes: no map needed
    assert class_counts(sb_fold1["paths"]["test"], ["neu", "hap", "ang", "sad"], data_root=mini_iemocap.root) \
        == [3, 3, 2, 2]


def test_duration_read_from_the_wav_when_length_is_absent(sb_fold1, tmp_path):
    from lobes.dataio import make_dataset

    ours = sb_fold1["ours"]["valid"]
    path = tmp_path / "valid.json"
    path.write_text(json.dumps({u: {"wav": e["wav"], "emo": e["emo"]} for u, e in ours.items()}))
    ds = make_dataset(str(path), [], ["duration"])
    assert {ds[i]["id"]: ds[i]["duration"] for i in range(len(ds))} == {u: e["duration"] for u, e in ours.items()}


@pytest.mark.parametrize("case, message", [
    ("unknown", "emotion 'fru' is not a class ['Anger', 'Happiness', 'Neutral', 'Sadness'] after label_map"),
    ("no_root", "holds SpeechBrain's {data_root} placeholder but no data_root was given"),
])
def test_bad_speechbrain_entry_names_manifest_and_utterance(sb_fold1, mini_iemocap, tmp_path, case, message):
    from lobes.dataio import ser_datasets

    data = json.loads(Path(sb_fold1["paths"]["valid"]).read_text())
    utt = sorted(data)[1]
    if case == "unknown":
        data[utt]["emo"] = "fru"
    path = tmp_path / "valid.json"
    path.write_text(json.dumps(data))
    root = None if case == "no_root" else mini_iemocap.root
    first = utt if case == "unknown" else next(iter(data))
    with pytest.raises(DataError, match=re.escape(f"manifest '{path}': utterance '{first}': ") + ".*"
                       + re.escape(message)):
        ser_datasets({"valid": str(path)}, MSP_NAMES, label_map=TO_MSP, data_root=root)


def test_ser_recipe_trains_on_speechbrain_manifests(sb_fold1, mini_iemocap, tmp_path):
    """IEMOCAP ser/train.py with SpeechBrain's option names and manifests, classes renamed by the label map."""
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm = make_tiny_wavlm(tmp_path / "tiny_wavlm")
    out = tmp_path / "ser"
    paths = sb_fold1["paths"]
    cmd = [sys.executable, str(ROOT / "recipes/IEMOCAP/ser/train.py"),
           str(ROOT / "recipes/IEMOCAP/ser/hparams/train_ser.yaml"),
           f"--data_folder={mini_iemocap.root}", f"--prep_folder={tmp_path / 'never_prepared'}",
           f"--train_annotation={paths['train']}", f"--valid_annotation={paths['valid']}",
           f"--test_annotation={paths['test']}", f"--emotion_classes={json.dumps(MSP_NAMES)}",
           f"--speechbrain_label_map={json.dumps(TO_MSP)}", f"--wavlm_source={wavlm}", f"--output_folder={out}",
           "--number_of_epochs=1", "--batch_size=16", "--head_hidden=16", "--num_bootstraps=20", "--device=cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not (tmp_path / "never_prepared").exists()  # the annotations replace preparation
    t = json.loads((out / "metrics.json").read_text())["test"]
    assert t["classes"] == MSP_NAMES and t["n"] == 10
    assert [sum(r) for r in t["confusion"]] == [2, 3, 3, 2]  # Session 1's ang 2, hap 3, neu 3, sad 2
    rows = list(csv.reader(open(out / "predictions.csv")))
    assert rows[0][3:] == MSP_NAMES
    assert {r[0]: r[1] for r in rows[1:]} == {u: TO_MSP[e["emo"]] for u, e in sb_fold1["ours"]["test"].items()}


def test_only_some_annotations_given_is_an_error(load_recipe):
    prep = load_recipe("recipes/IEMOCAP/iemocap_prepare.py")
    with pytest.raises(DataError, match=re.escape("['valid_annotation'] not set")):
        prep.annotation_manifests({"train_annotation": "a.json", "valid_annotation": None, "test_annotation": "c"})
    assert prep.annotation_manifests({f"{s}_annotation": None for s in ("train", "valid", "test")}) is None


def test_adaltm_recipe_trains_on_speechbrain_manifests(sb_fold1, mini_iemocap, tmp_path):
    """IEMOCAP adaltm/train.py (Setup 1: frozen base, cached features) on the same SpeechBrain manifests and options
    as the SER recipe above: every test utterance scored once, in the renamed classes; its seed recorded."""
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm = make_tiny_wavlm(tmp_path / "tiny_wavlm")
    paths = sb_fold1["paths"]
    cmd = [sys.executable, str(ROOT / "recipes/IEMOCAP/adaltm/train.py"),
           str(ROOT / "recipes/IEMOCAP/adaltm/hparams/rows/setup1_frozen.yaml"),
           f"--data_folder={mini_iemocap.root}", f"--prep_folder={tmp_path / 'never_prepared'}",
           f"--train_annotation={paths['train']}", f"--valid_annotation={paths['valid']}",
           f"--test_annotation={paths['test']}", f"--emotion_classes={json.dumps(MSP_NAMES)}",
           f"--speechbrain_label_map={json.dumps(TO_MSP)}", f"--wavlm_source={wavlm}",
           f"--exp_folder={tmp_path / 'rows'}", "--seed=7", "--number_of_epochs=1", "--head_hidden=16",
           "--num_bootstraps=20", "--device=cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not (tmp_path / "never_prepared").exists()  # the annotations replace preparation
    out = tmp_path / "rows" / "setup1_frozen" / "7" / "fold1"
    m = json.loads((out / "metrics.json").read_text())
    assert (m["experiment"], m["fold"], m["seed"]) == ("setup1_frozen", 1, 7)
    t = m["test"]
    assert t["classes"] == MSP_NAMES and t["n"] == 10
    assert [sum(r) for r in t["confusion"]] == [2, 3, 3, 2]  # Session 1's ang 2, hap 3, neu 3, sad 2
    rows = list(csv.reader(open(out / "predictions.csv")))
    assert rows[0][3:] == MSP_NAMES
    assert {r[0]: r[1] for r in rows[1:]} == {u: TO_MSP[e["emo"]] for u, e in sb_fold1["ours"]["test"].items()}
