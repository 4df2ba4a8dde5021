"""The mini demo learns (issue 17): from the pretrained tiny WavLM fixture, a reduced ASR-CTC fine-tuning reaches a
WER well below the all-blank 100 %, and the Setup-1 row (frozen base, α + head) a UAR well above 8-class chance.

Reduced but equivalent configuration of ``recipes/MSP-Podcast/adaltm/run.sh --mini true``: the same train.py
scripts, YAMLs, base and learning rates / masking as the demo's overrides, fewer epochs (the demo's numbers are
in README.md, "What the mini demo measures"). The ASR run is the out-of-domain one (the demo's mini LibriSpeech,
generated here: the cheaper of the two CTC fine-tunings). Fixed seed; the thresholds sit well clear of chance and
of the measured values (see the constants). ASR 44 s, Setup 1 about 20 s on the idle 2-core machine.
"""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "tools/fixtures/tiny_wavlm_pretrained"
SEED = 1986

# ASR: the demo's mini LibriSpeech (180 training, 48 test utterances: run.sh's --mini_libri_utts /
# --mini_libri_eval_utts) and asr_args (constant rates, time masking), 20 instead of 60 epochs. Measured (seed
# 1986): test WER 0.560 [0.469, 0.650], test CTC loss 0.963. The all-blank output of an untrained head scores
# WER 1.00 at a CTC loss near 3.0; the demo's 60 epochs reach 0.446.
ASR_CORPUS = {"n_libri": 180, "n_libri_eval": 48}
ASR_ARGS = ["--number_of_epochs=20", "--batch_size=4", "--lr=0.02", "--lr_wavlm=0.01", "--mask_time_prob=0.2",
            '--lr_schedulers={"opt_class":null,"backbone_opt_class":null}']
ASR_MAX_WER = 0.75
ASR_MAX_LOSS = 1.5
# Setup 1 (frozen base, features cached once): the demo's adaltm_args with 30 instead of 15 epochs (a cached row
# costs little per epoch; the demo gives every row 15 so that Table 1 compares equal budgets).
SER_ARGS = ["--number_of_epochs=30", "--lr=0.01", "--batch_size=16", "--head_hidden=64", "--num_bootstraps=20"]
SER_MIN_UAR = 0.45          # measured 0.75 (seed 1986); 8 classes: chance 0.125


def _train(script, hparams, args, timeout=900):
    cmd = [sys.executable, str(ROOT / script), str(ROOT / hparams), f"--seed={SEED}", f"--wavlm_source={BASE}",
           "--device=cpu", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_asr_ctc_from_the_pretrained_base_transcribes(mini_corpora, tmp_path):
    from tools.make_mini_corpora import make_mini_corpora

    libri = tmp_path / "libri"
    make_mini_corpora(None, libri, seed=mini_corpora.seed, **ASR_CORPUS)
    out = tmp_path / "asr"
    _train("recipes/LibriSpeech/asr_ctc/train.py", "recipes/LibriSpeech/asr_ctc/hparams/train_asr_ctc.yaml",
           [f"--data_folder={libri}", f"--prep_folder={tmp_path / 'prep'}", f"--output_folder={out}",
            "--use_tensorboard=False", *ASR_ARGS])
    assert len(json.loads((tmp_path / "prep" / "test-clean.json").read_text())) == ASR_CORPUS["n_libri_eval"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["wer"] <= ASR_MAX_WER, (m["wer"], m["asr_examples"])
    assert m["test_loss"] <= ASR_MAX_LOSS, m["test_loss"]


def test_setup1_frozen_pretrained_base_separates_emotions(msp_manifests, mini_corpora, tmp_path):
    _train("recipes/MSP-Podcast/adaltm/train.py", "recipes/MSP-Podcast/adaltm/hparams/rows/setup1_frozen.yaml",
           [f"--data_folder={mini_corpora.msp}", f"--prep_folder={msp_manifests}", "--skip_prep=True",
            f"--exp_folder={tmp_path}", f"--vectors_folder={tmp_path / 'none'}", *SER_ARGS])
    m = json.loads((tmp_path / "setup1_frozen" / str(SEED) / "metrics.json").read_text())
    assert m["test"]["n"] == len(json.loads((msp_manifests / "test.json").read_text()))
    assert m["test"]["uar"] >= SER_MIN_UAR, m["test"]["uar"]
