"""tools/pseudo_label.py: threshold, soft labels and the Emilia-style layout, on a model with known outputs."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from lobes.errors import DataError

CLASSES = ["Anger", "Happiness", "Neutral", "Sadness"]
PROBS = [0.1, 0.2, 0.3, 0.4]  # what the known model gives for every input


@pytest.fixture(scope="module")
def known_model(tmp_path_factory):
    """Tiny WavLM + α + SER head whose last layer is zero with bias log(PROBS): softmax = PROBS exactly."""
    from lobes.inference import Recognizer
    from lobes.ser_head import SERHead
    from lobes.wavlm_encoder import WavLMEncoder
    from lobes.weighted_sum import WeightedLayerSum
    from tools.make_tiny_wavlm import make_tiny_wavlm

    enc = WavLMEncoder(str(make_tiny_wavlm(tmp_path_factory.mktemp("pl") / "wavlm")), freeze=True)
    head = SERHead(enc.hidden_size, 16, num_classes=len(CLASSES), dropout=0.0)
    with torch.no_grad():
        head.classifier[-1].weight.zero_()
        head.classifier[-1].bias.copy_(torch.log(torch.tensor(PROBS)))
    return Recognizer(enc, WeightedLayerSum(enc.num_layers), head, classes=CLASSES)


def _corpus(root):
    rng = np.random.RandomState(0)
    root.mkdir()
    sf.write(str(root / "a.wav"), rng.randn(8000).astype("float32") * 0.1, 16000)
    sf.write(str(root / "b.flac"), rng.randn(6000, 2).astype("float32") * 0.1, 12000)  # stereo, 12 kHz
    (root / "sub").mkdir()
    sf.write(str(root / "sub" / "c.wav"), rng.randn(8000).astype("float32") * 0.1, 16000)
    (root / "sub" / "c.json").write_text(json.dumps({"id": "EN_B00001_S0001", "speaker": "EN_B00001",
                                                     "text": "HELLO THERE", "duration": 0.5}))
    sf.write(str(root / "d.wav"), rng.randn(8000).astype("float32") * 0.1, 16000)
    (root / "d.json").write_text("{not json")
    (root / "e.wav").write_bytes(b"RIFF\x00\x00corrupt")
    return root


def test_kept_files_carry_the_models_distribution_as_soft_labels(known_model, tmp_path):
    from lobes.dataio import ser_datasets
    from tools.pseudo_label import collect, pseudo_label, write_outputs

    items = collect([_corpus(tmp_path / "corpus")])
    assert [p.split("/")[-1] for p, _, _ in items] == ["a.wav", "b.flac", "d.wav", "e.wav", "c.wav"]
    manifest, rejected = pseudo_label(known_model, items, threshold=0.35)
    assert sorted(manifest) == ["EN_B00001_S0001", "a", "b"]
    for entry in manifest.values():
        assert entry["emo"] == "Sadness" and entry["emo_soft"] == pytest.approx(PROBS, abs=1e-6)
        assert entry["confidence"] == pytest.approx(0.4, abs=1e-6)
    emilia = manifest["EN_B00001_S0001"]
    assert emilia["spk_id"] == "EN_B00001" and emilia["wrd"] == "HELLO THERE" and emilia["duration"] == 0.5
    assert manifest["b"]["duration"] == 0.5 and manifest["b"]["spk_id"] == "unknown"  # 6000 samples at 12 kHz
    reasons = dict((p.split("/")[-1], r) for p, r in rejected)
    assert set(reasons) == {"d.wav", "e.wav"}
    assert "d.json: unreadable utterance JSON" in reasons["d.wav"] and "e.wav" in reasons["e.wav"]
    # the manifest is what the SER recipes read: soft labels in class order
    out = tmp_path / "pseudo.json"
    rej = write_outputs(out, manifest, rejected)
    assert rej.read_text().count("\n") == 1 + 2
    ds = ser_datasets({"train": str(out)}, CLASSES)["train"]
    item = ds[0]
    assert torch.allclose(item["soft_label"], torch.tensor(PROBS), atol=1e-6) and item["emo_idx"].item() == 3


def test_threshold_is_inclusive_and_leaves_the_rest_out_with_a_reason(known_model, tmp_path):
    from tools.pseudo_label import collect, main, pseudo_label

    items = [it for it in collect([_corpus(tmp_path / "corpus")]) if it[2] is None and "e.wav" not in it[0]]
    assert len(items) == 3
    kept, rejected = pseudo_label(known_model, items, threshold=0.4 - 1e-6)
    assert len(kept) == 3 and rejected == []
    kept, rejected = pseudo_label(known_model, items, threshold=0.4 + 1e-6)
    assert kept == {} and len(rejected) == 3
    assert all("confidence 0.4000 below threshold" in r for _, r in rejected)
    with pytest.raises(DataError, match="threshold must be a probability"):
        pseudo_label(known_model, items, threshold=1.5)
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.json"), "--threshold", "0.5",
                 str(tmp_path / "corpus")]) == 2
