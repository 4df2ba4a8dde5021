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


def test_the_prediction_is_of_the_rows_settings_micro_batch_duration_and_precision(smoke, monkeypatch):
    from tools import plan_memory as PM

    seen = []
    monkeypatch.setattr(PM, "predict", lambda settings, batch, seconds, gpus, shape: seen.append(
        (settings, batch, seconds, gpus, shape)) or {"peak": 3 * PM.GIB})
    args = argparse.Namespace(tiny=False, batch=8, seconds=11.0)
    cases = {c[0]: c for c in smoke.CASES}
    assert smoke.predicted_gib(cases["adaltm_setup4_dual-fused"], args, "bf16") == 3.0
    settings, batch, seconds, gpus, shape = seen[-1]
    assert (batch, seconds, gpus, shape) == (8, 11.0, 1, "large")
    assert settings["merge_impl"] == "fused" and settings["precision"] == "bf16" and settings["num_vectors"] == 2
    smoke.predicted_gib(cases["adaltm_setup4_dual-gc_cnn"], args, "fp32")
    assert seen[-1][0]["gradient_checkpointing"] == "cnn" and seen[-1][0]["merge_impl"] == "materialized"
    assert seen[-1][0]["precision"] == "fp32"
    assert smoke.predicted_gib(cases["ser"], args, "bf16") is None and len(seen) == 2  # the planner has no SER model
