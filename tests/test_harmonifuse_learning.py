"""The HarmoniFuse mini run learns: from the pretrained tiny WavLM and tiny causal LM fixtures, the main row (``full``)
of ``recipes/MSP-Podcast/harmonifuse/run.sh --mini true`` transcribes mini LibriSpeech with a WER well below 100 %
and names the 8 mini MSP-Podcast emotions with a UA well above chance (12.5 %).

It runs run.sh itself (stage 1, row ``full``) on the session's mini corpora and manifests, so the test follows the
mini settings of run.sh; only the number of bootstraps is reduced (an override after ``--``, which also checks that
a later override replaces a --mini default). Fixed seed; the thresholds sit well clear of chance and below the
measured values (see the constants; the full mini run's numbers are in the recipe's README, "Mini run").
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/MSP-Podcast/harmonifuse"
SEED = 1986
N_CLASSES = 8

# The mini run of the full row, fewer bootstraps. Chance on mini test-clean (16 utterances, 107 words; every test
# sentence is one of the 16 training sentences): a random training sentence scores WER 0.92 on average, the best
# single sentence for all utterances 0.73. SER: 8 balanced classes, chance UA 0.125.
REDUCED = ["--num_bootstraps=20"]
# measured 0.682 / 0.625 (seed 1986, simplex LM fusion, the default; seeds 2, 3: 0.598 / 0.646, 0.523 / 0.604);
# residual LM fusion 0.645 / 0.604; softmax fusion 0.402 / 0.625
MAX_WER = 0.70
MIN_UA = 0.40


@pytest.fixture(scope="session")
def mini_full_row(mini_corpora, msp_manifests, libri_manifests, tmp_path_factory):
    """metrics.json of the reduced mini run of the full row (run.sh stage 1, the session's manifests as its prep)."""
    exp = tmp_path_factory.mktemp("harmonifuse_mini")
    (exp / "prep").mkdir()
    (exp / "prep/msp").symlink_to(msp_manifests, target_is_directory=True)
    (exp / "prep/libri").symlink_to(libri_manifests, target_is_directory=True)
    cmd = ["bash", str(RECIPE / "run.sh"), "--mini", "true", "--stage", "1", "--stop_stage", "1", "--rows", "full",
           "--exp", str(exp), "--msp_folder", str(mini_corpora.msp), "--libri_folder", str(mini_corpora.libri),
           "--seeds", str(SEED), "--device", "cpu", "--", *REDUCED, "--noprogressbar"]
    # one thread: on a loaded 2-core machine two OpenMP threads per process run several times slower
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = exp / "rows/full" / str(SEED)
    return json.loads((out / "metrics.json").read_text()), (out / "hyperparams.yaml").read_text()


def test_mini_full_row_runs_with_the_run_sh_mini_settings(mini_full_row):
    _, hparams = mini_full_row
    assert "\nnum_bootstraps: 20" in hparams           # the override after -- replaced the --mini default
    assert "\nlm_mode: full" in hparams and "\nnum_beams: 4" in hparams   # the --mini settings reached train.py


def test_mini_full_row_transcribes_well_below_100_percent_wer(mini_full_row):
    m, _ = mini_full_row
    assert m["wer_by_split"]["test-clean"]["n_utts"] == 16
    assert m["wer"] <= MAX_WER, (m["wer"], m["asr_examples"])


def test_mini_full_row_separates_emotions_well_above_chance(mini_full_row):
    m, _ = mini_full_row
    assert m["test"]["n"] == 48 and len(m["test"]["per_class_recall"]) == N_CLASSES
    assert m["ua"] >= MIN_UA >= 3 / N_CLASSES, m["test"]   # the bound itself is 3x chance
