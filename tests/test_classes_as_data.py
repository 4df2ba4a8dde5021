"""Classes are recipe data: a 4-class label set flows from the manifest through ``lobes.dataio`` and
``lobes.collectors`` to metrics.json, predictions.csv and the confusion plot; nothing assumes 8."""
import csv
import json

import numpy as np
import pytest
import soundfile as sf
import speechbrain as sb
import torch

from lobes.brains import ToolkitBrain
from lobes.collectors import SERCollector, run_record
from lobes.dataio import class_counts, ser_datasets
from lobes.errors import DataError

CLASSES = ["neu", "hap", "ang", "sad"]  # IEMOCAP-style 4 classes, deliberately not alphabetical


class ToySER(ToolkitBrain):
    """Logits from the waveform's mean absolute amplitude: utterance i (amplitude ~ class) predicts its class."""

    def compute_forward(self, batch, stage):
        wavs, lens = batch.sig
        level = wavs.abs().mean(dim=1, keepdim=True)             # [B, 1]
        return -(level - self.modules.centres.weight.T) ** 2     # [B, 4]: nearest class centre wins

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.ser = SERCollector(self.hparams.emotion_classes)

    def compute_objectives(self, logits, batch, stage):
        if stage != sb.Stage.TRAIN:
            self.ser.add_logits(batch.id, logits, batch.emo_idx.data, batch.spk_id)
        return torch.nn.functional.cross_entropy(logits, batch.emo_idx.data.view(-1))

    def on_stage_end(self, stage, stage_loss, epoch=None):  # a test stage, as the SER recipes write it
        self.gather(self.ser)
        h = self.hparams
        metrics = {**run_record(h.output_folder, self.stage_loss(stage, stage_loss)),
                   **self.ser.report(h.num_bootstraps, h.seed, h.speaker_bootstrap)}
        return self.write_test(metrics, self.ser)


def _corpus(folder):
    """8 utterances, 2 per class; the amplitude of utterance k encodes its class (and one is mislabelled)."""
    folder.mkdir()
    man = {}
    levels = [0.1, 0.2, 0.3, 0.4]
    labels = ["neu", "neu", "hap", "hap", "ang", "ang", "sad", "neu"]  # the last one sounds "sad"
    for k, lab in enumerate(labels):
        level = levels[CLASSES.index(lab)] if k < 7 else levels[3]
        wav = folder / f"u{k}.wav"
        sf.write(wav, np.full(1600, level, dtype=np.float32) * np.sign(np.sin(np.arange(1600) + 0.5)), 16000)
        soft = [0.0] * 4
        soft[CLASSES.index(lab)] = 1.0
        man[f"u{k}"] = {"wav": str(wav), "duration": 0.1, "emo": lab, "emo_soft": soft, "spk_id": f"s{k % 2}"}
    path = folder / "test.json"
    path.write_text(json.dumps(man))
    return str(path)


def test_four_class_label_set_flows_to_metrics_and_predictions(tmp_path):
    manifest = _corpus(tmp_path / "data")
    assert class_counts(manifest, CLASSES) == [3, 2, 2, 1]
    with pytest.raises(DataError, match="expected one of \\['neu', 'hap'\\]"):
        class_counts(manifest, CLASSES[:2])  # 'ang' is not a class of a 2-class recipe: named, not ignored
    datasets = ser_datasets({"test": manifest}, CLASSES)
    centres = torch.nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        centres.weight.copy_(torch.tensor([[0.1], [0.2], [0.3], [0.4]]))
    out = tmp_path / "exp"
    out.mkdir()
    hparams = {"emotion_classes": CLASSES, "output_folder": str(out), "num_bootstraps": 10,
               "speaker_bootstrap": False, "seed": 0, "backbone_modules": [], "backbone_opt_class": None,
               "epoch_counter": sb.utils.epoch_loop.EpochCounter(1),
               "train_logger": sb.utils.train_logger.FileTrainLogger(str(out / "log.txt")),
               "use_tensorboard": False, "use_wandb": False}
    brain = ToySER(modules={"centres": centres}, opt_class=lambda p: torch.optim.SGD(p, lr=0.0), hparams=hparams,
                   run_opts={"device": "cpu", "noprogressbar": True})
    brain.evaluate(datasets["test"], test_loader_kwargs={"batch_size": 3})

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["classes"] == CLASSES
    assert metrics["test"]["n"] == 8
    assert len(metrics["test"]["confusion"]) == 4 and len(metrics["test"]["per_class_recall"]) == 4
    assert metrics["test"]["per_class_recall"] == pytest.approx([2 / 3, 1.0, 1.0, 1.0])
    assert metrics["test"]["uar"] == pytest.approx((2 / 3 + 3) / 4)
    rows = list(csv.reader(open(out / "predictions.csv")))
    assert rows[0] == ["id", "true", "pred"] + CLASSES
    assert {r[0]: (r[1], r[2]) for r in rows[1:]}["u7"] == ("neu", "sad")
    assert len(rows) == 9 and all(len(r) == 7 for r in rows)
    assert "fold" not in metrics and "alphas" not in metrics  # no fold / weighted layer sum in this recipe
    assert (out / "confusion.png").stat().st_size > 1000  # ToolkitBrain.write_test, for any SER collector


def test_four_class_confusion_plot_and_recognizer_use_the_given_names(tmp_path):
    from lobes import plots
    from lobes.inference import Recognizer
    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    png = plots.plot_confusion([[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], CLASSES, tmp_path / "c.png")
    assert png.exists()
    with pytest.raises(DataError, match="4 class names"):
        plots.plot_confusion(np.eye(8), CLASSES, tmp_path / "bad.png")

    class Enc(torch.nn.Module):
        def forward(self, wavs, lens):
            frames = wavs.unfold(1, 400, 320)[..., :8]                     # [B, T, 8]
            return torch.stack([frames, 2 * frames]), torch.ones(frames.shape[:2], dtype=torch.bool)

    head = SERHead(8, 16, num_classes=4)
    with pytest.raises(DataError, match="needs its class names"):
        Recognizer(Enc(), WeightedLayerSum(1), head)
    rec = Recognizer(Enc(), WeightedLayerSum(1), head, classes=CLASSES)
    probs, _ = rec.forward(torch.randn(2, 4000), torch.tensor([1.0, 1.0]))
    assert probs.shape == (2, 4) and rec.classes == CLASSES
