"""tools/pseudo_label.py: threshold, soft labels and the Emilia-style layout, on a model with known outputs."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from toy_encoder import ToyEncoder  # tests/ is on sys.path (pytest rootdir conftest)
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


# ----------------------------------------------------------------------- an HF audio-classification labeller
HF_LABELS = ["ang", "hap", "neu", "sad", "oth"]  # the labeller's own names; "oth" maps to no recipe class


@pytest.fixture(scope="module")
def hf_labeller_dir(tmp_path_factory):
    """A tiny WavLMForSequenceClassification (random, seeded) + its feature extractor, save_pretrained offline."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForSequenceClassification

    from tools.make_tiny_wavlm import CONFIG

    cfg = WavLMConfig(**{k: v for k, v in json.loads(CONFIG.read_text()).items() if k != "model_type"},
                      num_labels=len(HF_LABELS), id2label=dict(enumerate(HF_LABELS)),
                      label2id={c: i for i, c in enumerate(HF_LABELS)}, classifier_proj_size=16)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf_labeller")
    WavLMForSequenceClassification(cfg).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)
    return out


def _hf_probs(model_dir, path):
    """The labeller's distribution for one file, computed here directly with transformers."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from lobes.audio import read_audio

    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    model = AutoModelForAudioClassification.from_pretrained(model_dir).eval()
    x = fe([read_audio(path, 16000, convert=True).numpy()], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**x).logits[0], -1).tolist()


def test_an_hf_audio_classification_directory_labels_with_its_own_distribution(hf_labeller_dir, tmp_path):
    from tools.pseudo_label import HFAudioLabeller, main

    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "pseudo.json"
    # one file per batch (batch_seconds below every duration): each file is scored alone, as in _hf_probs
    assert main(["--model", str(hf_labeller_dir), "--out", str(out), "--threshold", "0", "--batch_seconds",
                 "0.01", str(corpus)]) == 0
    manifest = json.loads(out.read_text())
    assert sorted(manifest) == ["EN_B00001_S0001", "a", "b"]  # d.json unreadable, e.wav corrupt
    for entry in manifest.values():
        want = _hf_probs(hf_labeller_dir, entry["wav"])
        assert entry["emo_soft"] == pytest.approx(want, abs=1e-5)
        assert entry["emo"] == HF_LABELS[max(range(5), key=want.__getitem__)]
        assert entry["confidence"] == pytest.approx(max(want), abs=1e-5)
    assert HFAudioLabeller(str(hf_labeller_dir)).classes == HF_LABELS


def test_a_class_map_sums_renormalises_and_keeps_the_unmapped_mass_out_of_the_confidence(hf_labeller_dir, tmp_path):
    from tools.pseudo_label import main

    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "mapped.json"
    classes = ["Anger", "Happiness", "Neutral", "Sadness"]
    # ang and hap both -> Happiness (their probabilities add), oth -> nothing (dropped)
    assert main(["--model", str(hf_labeller_dir), "--out", str(out), "--threshold", "0", "--batch_seconds", "0.01",
                 "--class_map", "ang=Happiness,hap=Happiness,neu=Neutral,sad=Sadness",
                 "--classes", ",".join(classes), str(corpus)]) == 0
    for entry in json.loads(out.read_text()).values():
        p = _hf_probs(hf_labeller_dir, entry["wav"])
        mass = [0.0, p[0] + p[1], p[2], p[3]]
        assert entry["emo_soft"] == pytest.approx([m / sum(mass) for m in mass], abs=1e-5)
        assert entry["confidence"] == pytest.approx(max(mass), abs=1e-5)  # before renormalising
        assert entry["emo"] == classes[max(range(4), key=mass.__getitem__)]
    bad = ["--model", str(hf_labeller_dir), "--out", str(out), "--threshold", "0", str(corpus)]
    assert main(bad + ["--class_map", "ang=Anger"]) == 2                              # no --classes
    assert main(bad + ["--class_map", "xyz=Anger", "--classes", "Anger"]) == 2        # not a labeller label
    assert main(bad + ["--class_map", "ang=Rage", "--classes", "Anger"]) == 2         # not a recipe class


# ----------------------------------------------------------------------- HarmoniFuse: the soft-target SER loss
EMO = ["Anger", "Happiness", "Neutral", "Sadness"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tools.make_tiny_lm import make_tiny_lm
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "lm")


def _speech_lm(lm_dir, mode, chunk=None):
    from lobes.harmonifuse.speech_lm import SpeechLM

    torch.manual_seed(0)
    return SpeechLM(ToyEncoder(num_layers=2, seed=0), str(lm_dir), ser={"mode": mode, "emotions": EMO}, loss_chunk_size=chunk)


def test_generative_soft_loss_is_the_expected_nll_of_the_emotion_words(tiny_lm):
    """Σ_c p_c NLL(word_c) / Σ_c p_c tokens(word_c), each NLL from the hard loss of one utterance and one word;
    one-hot soft labels give the hard loss itself, also chunked in training."""
    m = _speech_lm(tiny_lm, "generate").eval()
    torch.manual_seed(1)
    wavs, lens = torch.randn(2, 800), torch.ones(2)
    hard = m(wavs, lens, "ser", ["Anger", "Sadness"]).loss
    onehot = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    assert m(wavs, lens, "ser", soft_targets=onehot).loss.item() == pytest.approx(hard.item(), abs=1e-6)
    p = torch.tensor([[0.25, 0.75, 0, 0], [0, 0, 0.4, 0.6]])
    num = den = 0.0
    for b in range(2):
        for c in range(4):
            if p[b, c] > 0:
                n = len(EMO[c]) + 1                                   # char tokens + EOS
                nll = m(wavs[b:b + 1], lens[b:b + 1], "ser", [EMO[c]]).loss.item() * n
                num, den = num + p[b, c].item() * nll, den + p[b, c].item() * n
    soft = m(wavs, lens, "ser", soft_targets=p).loss
    assert soft.item() == pytest.approx(num / den, abs=1e-5)
    # training path: chunked loss (chunk of 3 tokens), the same value, and a gradient
    mt = _speech_lm(tiny_lm, "generate", chunk=3).train()
    out = mt(wavs, lens, "ser", soft_targets=p)
    assert out.loss.item() == pytest.approx(num / den, abs=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mt.adapter.parameters() if p.dim() > 1)


def test_classify_soft_loss_is_soft_cross_entropy(tiny_lm):
    m = _speech_lm(tiny_lm, "classify").eval()
    torch.manual_seed(1)
    wavs, lens = torch.randn(3, 800), torch.ones(3)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0, 0, 0], [0, 0.5, 0.5, 0]])
    out = m(wavs, lens, "ser", soft_targets=p)
    want = -(p * torch.log_softmax(out.logits, -1)).sum(-1).mean()
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-6)
    hard = m(wavs[1:2], lens[1:2], "ser", ["Anger"]).loss
    assert m(wavs[1:2], lens[1:2], "ser", soft_targets=p[1:2]).loss.item() == pytest.approx(hard.item(), abs=1e-6)
    with pytest.raises(DataError, match=r"expected \[batch, 4\]"):
        m(wavs, lens, "ser", soft_targets=torch.ones(3, 5) / 5)


def test_pseudo_label_threshold_drops_unconfident_utterances_and_each_source_logs_its_own_loss(tmp_path, caplog):
    from lobes.dataio import ser_datasets
    from lobes.harmonifuse.data import confident_subset
    from lobes.harmonifuse.task_losses import TaskLosses
    from lobes.harmonifuse.task_split import TaskSplit

    rng = np.random.RandomState(0)
    man = {}
    for i, soft in enumerate([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25] * 4, [0, 0, 0.5, 0.5]]):
        wav = tmp_path / f"u{i}.wav"
        sf.write(str(wav), rng.randn(1600).astype("float32") * 0.1, 16000)
        man[f"u{i}"] = {"wav": str(wav), "duration": 0.1, "emo": EMO[int(np.argmax(soft))], "emo_soft": soft,
                        "spk_id": "s"}
    (tmp_path / "m.json").write_text(json.dumps(man))
    ds = ser_datasets({"train": str(tmp_path / "m.json")}, EMO)["train"]
    with caplog.at_level("INFO"):
        kept = confident_subset(ds, 0.5, "emilia")
    assert [kept[i]["soft_label"].tolist() for i in range(len(kept))] == [[0.699999988079071, 0.10000000149011612,
                                                                           0.10000000149011612, 0.10000000149011612],
                                                                          [0.0, 0.0, 0.5, 0.5]]
    assert "ser_extra_sources.emilia: 2 of 4 utterances below pseudo_label_threshold 0.5 left out" in caplog.text
    assert len(confident_subset(ds, 0.0, "emilia")) == 4
    with pytest.raises(DataError, match="every one of its 4 utterances is below"):
        confident_subset(ds, 0.9, "emilia")
    losses = TaskLosses()
    for tag, v in ((TaskSplit("ser"), 1.0), (TaskSplit("ser", "emilia"), 3.0), (TaskSplit("asr"), 2.0),
                   (TaskSplit("ser"), 2.0)):
        losses.add_train(tag, torch.tensor(v))
    assert losses.log_stats() == {"loss_asr": 2.0, "loss_ser": 1.5, "loss_ser_emilia": 3.0}
