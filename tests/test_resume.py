"""Kill-and-resume and determinism of the AdaLTM recipe (train.py run as a subprocess on the mini corpus).

Four runs of the *same* command (setup4_dual row: trainable layer-wise λ over two tiny task vectors, α, head
with dropout; 2 epochs of 4 steps; an intra-epoch checkpoint after every step), each in its own experiment folder:

* A, B: uninterrupted (B only for determinism: same seed -> identical metrics.json / coefficients.json);
* C: SIGKILLed in epoch 2 once an intra-epoch checkpoint after step >= 2 is on disk, then started again.

Exact equality is expected, not closeness: the resumed run restores λ, α, head, optimizer, epoch counter, the
step / running train loss, the loader position (SpeechBrain skips the consumed batches of the seeded sampler)
and, through ``lobes.checkpointing.AtomicCheckpointer``, the RNG streams (dropout masks).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes/MSP-Podcast/adaltm/train.py"
ROW = ROOT / "recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml"
SUBSET = {"train": 8, "valid": 4, "test": 4}
BATCH, EPOCHS = 2, 2
STEPS_PER_EPOCH = SUBSET["train"] // BATCH
INTRA_FLAG = "brain_intra_epoch_ckpt"  # speechbrain.core.INTRA_EPOCH_CKPT_FLAG
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def make_setup(root, msp_manifests):
    """Tiny WavLM, two tiny task vectors (seeded ΔW) and a subset of the mini-corpus manifests."""
    from tools.make_tiny_wavlm import make_tiny_wavlm
    from transformers import WavLMModel

    from lobes.adaltm.task_vector import compute_task_vector, save_task_vector

    wavlm = make_tiny_wavlm(root / "tiny_wavlm")
    base = WavLMModel.from_pretrained(wavlm).state_dict()
    g = torch.Generator().manual_seed(7)
    for name in ("asr_in", "ser"):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.items()}
        save_task_vector(compute_task_vector(base, ft, name), root / "vectors" / f"{name}.safetensors")
    prep = root / "prep"
    prep.mkdir()
    for split, n in SUBSET.items():
        man = json.loads((msp_manifests / f"{split}.json").read_text())
        (prep / f"{split}.json").write_text(json.dumps({k: man[k] for k in sorted(man)[:n]}))
    return wavlm


def command(root, exp):
    return [sys.executable, str(TRAIN), str(ROW), f"--data_folder={root}/unused", f"--prep_folder={root}/prep",
            "--skip_prep=True", f"--wavlm_source={root}/tiny_wavlm", f"--vectors_folder={root}/vectors",
            f"--exp_folder={exp}", f"--number_of_epochs={EPOCHS}", f"--batch_size={BATCH}", "--lr=0.01",
            "--head_hidden=16", "--num_bootstraps=20", "--device=cpu", "--ckpt_interval_steps=1",
            "--noprogressbar"]


def out_dir(exp):
    return exp / "setup4_dual" / "1986"


def start(cmd, log, procs):
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    return proc


def finish(proc, log, timeout=300):
    rc = proc.wait(timeout=timeout)
    assert rc == 0, Path(log).read_text()[-4000:]


def checkpoints(save):
    """[(CKPT dir, meta, dataloader position or None, epoch)] of the published checkpoints, oldest first."""
    import yaml

    out = []
    for d in save.glob("CKPT+*"):
        try:
            meta = yaml.safe_load((d / "CKPT.yaml").read_text())
            epoch = int((d / "counter.ckpt").read_text())
            pos = (d / "dataloader-TRAIN.ckpt").read_text()
        except (OSError, ValueError):
            continue  # being deleted right now
        out.append((d, meta, None if pos == "None" else int(pos), epoch))
    return sorted(out, key=lambda c: c[1]["unixtime"])


def kill_mid_epoch(proc, save, log, epoch=2, min_pos=2, timeout=240):
    """SIGKILL ``proc`` as soon as an intra-epoch checkpoint of ``epoch`` after >= ``min_pos`` batches exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + Path(log).read_text()[-3000:])
        if any(m.get(INTRA_FLAG) and e == epoch and p is not None and p >= min_pos
               for _, m, p, e in checkpoints(save)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no intra-epoch checkpoint appeared")


@pytest.fixture(scope="module")
def runs(msp_manifests, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_setup(root, msp_manifests)
    exp = {k: root / f"exp_{k}" for k in "ABC"}
    logs = {k: root / f"{k}.log" for k in ("A", "B", "C1", "C2")}
    # Two single-threaded runs at a time (A beside the run to be killed, then B beside the restart).
    procs = []
    try:
        a = start(command(root, exp["A"]), logs["A"], procs)
        c1 = start(command(root, exp["C"]), logs["C1"], procs)
        save_c = out_dir(exp["C"]) / "save"
        kill_mid_epoch(c1, save_c, logs["C1"])
        killed = {"rc": c1.returncode, "checkpoints": checkpoints(save_c),
                  # (a kill right after the rename may leave the writer marker .writer: not a checkpoint file)
                  "ckpt_files": {d.name: {f.name for f in d.iterdir() if f.name != ".writer"}
                                 for d in save_c.glob("CKPT+*")},
                  "files": sorted(p.name for p in out_dir(exp["C"]).iterdir()),
                  "debris": sorted(p.name for p in save_c.iterdir() if p.name.startswith("."))}
        b = start(command(root, exp["B"]), logs["B"], procs)
        c2 = start(command(root, exp["C"]), logs["C2"], procs)
        for proc, key in ((a, "A"), (b, "B"), (c2, "C2")):
            finish(proc, logs[key])
    finally:
        for proc in procs:  # a failure above must not leave training processes behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"exp": exp, "logs": logs, "killed": killed}


def _json(path):
    return json.loads(path.read_text())


def _no_timestamps(metrics):
    return {k: v for k, v in metrics.items() if "time" not in k.lower()}


def test_kill_lands_mid_epoch_after_an_intra_epoch_checkpoint(runs):
    killed = runs["killed"]
    assert killed["rc"] == -signal.SIGKILL
    assert "metrics.json" not in killed["files"] and "coefficients.json" not in killed["files"]
    last_dir, meta, pos, epoch = killed["checkpoints"][-1]  # the one a restart resumes from (most recent)
    assert meta[INTRA_FLAG] is True and meta["end-of-epoch"] is False
    assert epoch == 2 and 2 <= pos < STEPS_PER_EPOCH
    # epoch 1's end-of-epoch checkpoint (with its validation loss) is kept beside it
    assert any(m["end-of-epoch"] and "loss" in m and e == 1 for _, m, _, e in killed["checkpoints"])
    # Whatever the kill interrupted, every published checkpoint is complete; only temp / trash names can be partial.
    expected = {"CKPT.yaml", "brain.ckpt", "counter.ckpt", "dataloader-TRAIN.ckpt", "lambdas.ckpt", "opt_class.ckpt",
                "rng_state.ckpt", "ser_head.ckpt", "weighted_sum.ckpt"}
    assert killed["ckpt_files"] and all(files == expected for files in killed["ckpt_files"].values())
    assert all(n.startswith((".tmp-CKPT+", ".trash-CKPT+")) for n in killed["debris"])
    log = runs["logs"]["C2"].read_text()
    assert f"Loading a checkpoint from {last_dir}" in log


def test_resumed_run_equals_uninterrupted_run(runs):
    a, c = out_dir(runs["exp"]["A"]), out_dir(runs["exp"]["C"])
    coef_a, coef_c = _json(a / "coefficients.json"), _json(c / "coefficients.json")
    assert set(coef_a["lambda"]) == {"ASR", "SER"}
    assert any(abs(v - 0.5) > 1e-4 for v in coef_a["lambda"]["SER"])  # λ trained, so equality means something
    for name in ("ASR", "SER"):
        assert coef_c["lambda"][name] == pytest.approx(coef_a["lambda"][name], abs=1e-6, rel=0)
    assert coef_c["alpha"] == pytest.approx(coef_a["alpha"], abs=1e-6, rel=0)
    # bit-exact in fact: same batches, same dropout masks (RNG restored), same float ops on CPU
    assert coef_c == coef_a
    assert _no_timestamps(_json(c / "metrics.json")) == _no_timestamps(_json(a / "metrics.json"))
    assert (c / "predictions.csv").read_text() == (a / "predictions.csv").read_text()
    # the restart left no debris: no temp / trash directory, only published checkpoints
    assert not [p for p in (c / "save").iterdir() if not p.name.startswith("CKPT+")]


def test_same_seed_gives_identical_metrics_twice(runs):
    a, b = out_dir(runs["exp"]["A"]), out_dir(runs["exp"]["B"])
    m_a, m_b = _json(a / "metrics.json"), _json(b / "metrics.json")
    assert _no_timestamps(m_a) == _no_timestamps(m_b)
    assert m_a["test"]["n"] == SUBSET["test"] and 0.0 <= m_a["test"]["uar"] <= 1.0
    assert _json(a / "coefficients.json") == _json(b / "coefficients.json")
