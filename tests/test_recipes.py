"""Recipe tests (SpeechBrain's recipe-test idea): every train.py runs on the mini corpora with the tiny WavLM.

One pipeline is run through the recipe's own run.sh: stages 0-2 (prep, ASR-CTC in- and out-of-domain, SER),
then stage 3+4 *alone* on those outputs (task vectors, AdaLTM rows, an MTL row, results table). Which rows run
and the files each must write come from the recipe registry (tests/recipes.csv, run = tests/test_recipes.py).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe_registry import row_name, rows_run_by

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "recipes/MSP-Podcast/adaltm/run.sh"
REGISTERED = rows_run_by("tests/test_recipes.py")
ROWS = [row_name(r) for r in REGISTERED if r["script"] == "recipes/MSP-Podcast/adaltm/train.py"]
MTL_ROWS = [row_name(r) for r in REGISTERED if r["script"] == "recipes/MSP-Podcast/mtl/train.py"]


def _sh(args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(RUN), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def pipeline(mini_corpora, tmp_path_factory):
    from tools.make_tiny_wavlm import make_tiny_wavlm

    root = tmp_path_factory.mktemp("pipeline")
    wavlm = make_tiny_wavlm(root / "tiny_wavlm")
    exp = root / "exp"
    common = ["--data_folder", str(mini_corpora.msp), "--libri_folder", str(mini_corpora.libri),
              "--wavlm_source", str(wavlm), "--exp", str(exp)]
    fast = "--number_of_epochs=1 --batch_size=16"
    _sh(["--stage", "0", "--stop_stage", "2", *common, "--asr_args", fast,
         "--ser_args", f"{fast} --head_hidden=16 --num_bootstraps=20"])
    out = _sh(["--stage", "3", "--stop_stage", "4", *common, "--rows", " ".join(ROWS), "--mtl_rows", " ".join(MTL_ROWS),
               "--adaltm_args", "--number_of_epochs=2 --lr=0.01 --head_hidden=16 --num_bootstraps=20",
               "--mtl_args", f"{fast} --head_hidden=16 --num_bootstraps=20"])
    return exp, out


def _metrics(path):
    return json.loads((path / "metrics.json").read_text())


def _has_checkpoint(folder):
    ckpts = list((folder / "save").glob("CKPT+*/CKPT.yaml"))
    return len(ckpts) >= 1


def _in_range(m, exp):
    t = m["test"]
    for k in ("uar", "precision", "macro_f1", "accuracy"):
        assert 0.0 <= t[k] <= 1.0, k
        lo, hi = t.get(f"{k}_ci", [t[k], t[k]])
        assert lo <= t[k] + 1e-12 and t[k] <= hi + 1e-12
    # every utterance of the (transcript-subset) test manifest was scored exactly once
    assert t["n"] == len(json.loads((exp / "prep" / "msp" / "test.json").read_text()))


@pytest.mark.parametrize("name", ["asr_ctc_msp", "asr_ctc_libri"])
def test_asr_ctc_recipes_write_checkpoint_wer_and_export(pipeline, name):
    exp, _ = pipeline
    folder = exp / name
    assert _has_checkpoint(folder)
    m = _metrics(folder)
    assert math.isfinite(m["wer"]) and m["wer"] >= 0.0
    # the same hypotheses also scored after Whisper's English normaliser (values: tests/test_ctc_text.py)
    assert math.isfinite(m["wer_whisper_norm"]) and m["wer_whisper_norm"] >= 0.0
    assert (folder / "finetuned_wavlm" / "model.safetensors").is_file()


def test_ser_recipe_writes_checkpoint_and_metrics(pipeline):
    exp, _ = pipeline
    folder = exp / "ser"
    assert _has_checkpoint(folder)
    m = _metrics(folder)
    assert sum(m["alphas"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= m["test"]["uar"] <= 1.0


def test_stage3_task_vectors_equal_finetuned_minus_base(pipeline):
    from safetensors.torch import load_file
    from transformers import WavLMModel

    exp, _ = pipeline
    base = WavLMModel.from_pretrained(exp.parent / "tiny_wavlm").state_dict()
    ft = WavLMModel.from_pretrained(exp / "ser" / "finetuned_wavlm").state_dict()
    vec = load_file(str(exp / "task_vectors" / "ser.safetensors"))
    key = "encoder.layers.1.feed_forward.intermediate_dense.weight"
    assert torch.allclose(vec[key], ft[key] - base[key], atol=1e-7)
    assert {p.name for p in (exp / "task_vectors").iterdir()} == {"asr_in.safetensors", "asr_out.safetensors",
                                                                  "ser.safetensors"}


@pytest.mark.parametrize("row", ROWS)
def test_adaltm_rows_from_stage3_alone(pipeline, row):
    exp, _ = pipeline
    folder = exp / "rows" / row / "1986"
    assert _has_checkpoint(folder)
    m = _metrics(folder)
    _in_range(m, exp)
    coeffs = json.loads((folder / "coefficients.json").read_text())
    assert sum(coeffs["alpha"]) == pytest.approx(1.0, abs=1e-5)
    assert (folder / "folded_wavlm" / "model.safetensors").is_file()
    if row == "setup1_frozen":
        assert coeffs["lambda"] == {}
    elif row == "static_global":
        assert all(v == 0.5 for lam in coeffs["lambda"].values() for v in lam)  # fixed λ never moves
    else:
        lam = coeffs["lambda"]
        assert set(lam) == {"ASR", "SER"} and all(len(v) == 5 for v in lam.values())
        assert any(abs(v - 0.5) > 1e-4 for v in lam["SER"])  # trained λ moved from its init
        assert (folder / "lambdas.png").stat().st_size > 1000


def test_mtl_static_init_row(pipeline):
    exp, _ = pipeline
    folder = exp / "rows" / "mtl_static_init" / "1986"
    assert _has_checkpoint(folder)
    m = _metrics(folder)
    _in_range(m, exp)
    assert math.isfinite(m["wer"]) and m["wer"] >= 0.0
    # its transcripts and the in-domain source's (tools.eval_asr) pair up: ΔWER = the two metrics.json WERs
    from tools.compare_rows import compare_paths

    source = exp / "results" / "sources" / "asr_in"
    res = compare_paths(source, folder.parent, num_bootstraps=50, num_permutations=100)["asr"]
    r = res["metrics"]["wer"]
    assert (res["n"], res["n_runs"], res["dropped"]) == (m["test"]["n"], 1, [0, 0])
    assert (r["a"], r["b"]) == (pytest.approx(_metrics(source)["wer"], abs=1e-12), pytest.approx(m["wer"], abs=1e-12))


def test_results_table_has_every_run_row(pipeline):
    exp, out = pipeline
    table = (exp / "results" / "table.md").read_text()
    for row in ["Setup 1: Baseline (Frozen Backbone)", "Setup 4: Proposed Dual-Vector",
                "In-Domain Dual-Vectors (Ours)", "Adaptive Layer-wise Merging (Ours)",
                "Static Global Merging (λ=0.5)", "MTL w/ static init. (W_base+0.5ΔW)"]:
        assert row in table
    csv_lines = (exp / "results" / "table.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 + 6  # header + 3 source models + setup1, setup4 x3 parts, static global, MTL
    assert "Setup 4: Proposed Dual-Vector" in out  # stage 4 prints the table
    # reference rows: stage 2's SER metrics, the stage-1 ASR models' WER on the MSP-Podcast test manifest
    ser = _metrics(exp / "ser")["test"]
    assert f"| SER source (W_SER) | {100 * ser['uar']:.2f}" in table
    for which, label in (("in", "In-domain ASR source (W_ASR_in)"), ("out", "Out-of-domain ASR source (W_ASR_out)")):
        m = json.loads((exp / "results" / "sources" / f"asr_{which}" / "metrics.json").read_text())
        assert m["n"] == len(json.loads((exp / "prep" / "msp" / "test.json").read_text()))
        lo, hi = m["wer_ci"]
        assert lo <= m["wer"] <= hi
        assert f"| {label} | - | - | - | {100 * m['wer']:.2f} ± {100 * (hi - lo) / 2:.2f} |" in table
    # Figures 2 and 3 from the rows that ran (setup4_dual only: its two lines in each)
    for name in ("figure2_lambda_dual_vs_single.png", "figure3_lambda_domain.png"):
        assert (exp / "results" / "plots" / name).stat().st_size > 1000


def test_ddp_two_cpu_processes_keep_lambda_identical(pipeline, tmp_path):
    exp, _ = pipeline
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "recipes/MSP-Podcast/adaltm/train.py"),
           str(ROOT / "recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml"),
           f"--data_folder={exp}/data_unused", f"--prep_folder={exp}/prep/msp", "--skip_prep=True",
           f"--wavlm_source={exp.parent / 'tiny_wavlm'}", f"--vectors_folder={exp}/task_vectors",
           f"--exp_folder={tmp_path}", "--number_of_epochs=1", "--lr=0.01", "--head_hidden=16",
           "--num_bootstraps=20", "--device=cpu", "--distributed_backend=gloo"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = tmp_path / "setup4_dual" / "1986" / "ranks"
    lam0 = json.loads((ranks / "coefficients_rank0.json").read_text())["lambda"]
    lam1 = json.loads((ranks / "coefficients_rank1.json").read_text())["lambda"]
    assert lam0 == lam1
    assert any(abs(v - 0.5) > 1e-5 for v in lam0["ASR"])  # they trained, and stayed in sync


def _pipeline_folder(exp, row):
    """Where run.sh puts the run of a registry row."""
    script, name = row["script"], row_name(row)
    if script.endswith("adaltm/train.py"):
        return exp / "rows" / name / "1986"
    if script.endswith("mtl/train.py"):
        return exp / "rows" / f"mtl_{name}" / "1986"
    return exp / {"recipes/MSP-Podcast/ser/train.py": "ser", "recipes/MSP-Podcast/asr_ctc/train.py": "asr_ctc_msp",
                  "recipes/LibriSpeech/asr_ctc/train.py": "asr_ctc_libri"}[script]


@pytest.mark.parametrize("row", REGISTERED, ids=[r["hparams"].removeprefix("recipes/") for r in REGISTERED])
def test_registered_runs_write_their_listed_outputs(pipeline, row):
    exp, _ = pipeline
    folder = _pipeline_folder(exp, row)
    assert row["outputs"], row["hparams"]
    for name in row["outputs"]:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, f"{row['hparams']}: no {folder / name}"
