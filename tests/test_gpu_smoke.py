"""benchmarks/gpu_smoke.py's memory columns: the planner's prediction of the same row and settings as the measured
steps, and the measured allocated / reserved peaks over it (the measurement itself needs CUDA)."""
import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks/gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_columns_divide_the_measured_peaks_by_the_prediction(smoke):
    assert smoke.memory_columns(20.0, 17.0, 23.5) == ["20.00", "17.00", "23.50", "0.85", "1.18"]
    assert smoke.memory_columns(None, 17.0, 23.5) == ["-", "17.00", "23.50", "-", "-"]   # a Brain not planned
    assert smoke.memory_columns(3.0, None, None) == ["3.00", "-", "-", "-", "-"]         # no CUDA: not measured
    assert len(smoke.MEMORY_HEADER) == 5


def test_the_prediction_is_brain_predictors_of_the_measured_modules_batch_and_precision(smoke, monkeypatch):
    """Every row gets a prediction: BrainPredictor on the measured hparams with one of the measured utterances,
    at --batch and the run's precision; HarmoniFuse the larger of its task batches."""
    import lobes.memory_plan as MP

    seen = []

    class Recorder:
        def __init__(self, hparams, brain_class, item=None, seconds=None):
            self.task = item.get("task")
            seen.append((hparams, brain_class, sorted(item), item["sig"].shape[0], seconds))

        def __call__(self, micro, precision=None):
            seen.append((self.task, micro, precision))
            return {"model": {"asr": 1, "ser": 3, None: 2}[self.task] * MP.GIB, "dynamic_peak": 0, "kernel_temp": 0,
                    "trainable": 0}
    monkeypatch.setattr(MP, "BrainPredictor", Recorder)
    args = argparse.Namespace(batch=8, seconds=11.0)
    cases = {c[0]: c for c in smoke.CASES}
    hparams = {"train_tasks": ["asr", "ser"]}
    assert smoke.predicted_gib(cases["harmonifuse_full"], hparams, "HFBrain", args, "bf16") == 3.0
    assert seen == [(hparams, "HFBrain", sorted(["id", "sig", "wrd", "tokens", "task"]), 176000, 11.0), ("asr", 8, "bf16"),
                    (hparams, "HFBrain", sorted(["id", "sig", "emo_idx", "soft_label", "spk_id", "task"]), 176000, 11.0),
                    ("ser", 8, "bf16")]
    seen.clear()
    assert smoke.predicted_gib(cases["ser"], {}, "SERBrain", args, "fp32") == 2.0
    assert seen[1] == (None, 8, "fp32") and "soft_label" in seen[0][2] and "task" not in seen[0][2]
