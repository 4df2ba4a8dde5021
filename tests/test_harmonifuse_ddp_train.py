"""HarmoniFuse under DDP trains as one process: ``<task>_batch_size`` is the global batch of a step, each rank
runs a contiguous share of it, and each share's loss is weighted so that DDP's gradient average is the
single-process batch mean (``lobes.harmonifuse.task_losses``, ``lobes.distributed.share_weight``).

The training run compares two gloo processes with one, both in float64 (the child processes set the default
dtype; the LM via ``lm_dtype``) with the recipe's AdamW: float32 reduction-order noise (~1e-7 on a gradient),
which Adam divides by the gradient's own size, would otherwise move near-zero-gradient weights by up to 1e-4.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from lobes import distributed as D
from lobes.harmonifuse import data as HD
from lobes.harmonifuse.interleave import batch_task

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/MSP-Podcast/harmonifuse"
CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
# ASR: 6 utterances in global batches of 3 (shares of 2 and 1); SER: 7 in 3, 3, 1 (the last leaves rank 1 a
# zero-weight padding share); interleave_length max: 3 rounds, ASR cycled: 6 steps
N_TRAIN = {"asr": 6, "ser": 7}


def _first(n):
    return lambda d: dict(sorted(d.items())[:n])


def _subsets(msp_manifests, libri_manifests, root, n_eval=1):
    out = {}
    for name, src, keep in (
            ("msp", msp_manifests, {"train": _first(N_TRAIN["ser"]), "valid": _first(n_eval), "test": _first(n_eval)}),
            ("libri", libri_manifests, {"train-clean-100": _first(N_TRAIN["asr"]), "dev-clean": _first(n_eval),
                                        "test-clean": _first(n_eval)})):
        dst = root / name
        dst.mkdir(parents=True)
        for path in src.glob("*.json"):
            data = json.loads(path.read_text())
            (dst / path.name).write_text(json.dumps(keep[path.stem](data) if path.stem in keep else data))
        out[name] = dst
    return out


def test_split_batch_is_contiguous_and_covers_each_item_once():
    from lobes.harmonifuse.interleave import BatchShares, split_batch

    assert split_batch([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_batch([1, 2, 3, 4, 5], 3) == [[1, 2], [3, 4], [5]]
    assert split_batch([7], 3) == [[7], [], []]
    shares = [list(BatchShares([[4, 5, 6], [9]], r, 2)) for r in (0, 1)]
    assert shares == [[[4, 5], [9]], [[6], [9]]] and type(shares[1][1][0]).__name__ == "PaddingIndex"
    assert type(shares[0][1][0]) is int


def test_ddp_shares_are_the_single_process_batches_in_its_task_order(msp_manifests, libri_manifests, tmp_path,
                                                                     monkeypatch):
    """2 ranks (RANK / WORLD_SIZE as torchrun sets them): every epoch the ranks run the single-process task order,
    and at each step rank 0's then rank 1's utterances are that step's single-process batch, each once (a global
    batch of one utterance: rank 1 runs it as padding, which counts for nothing)."""
    from lobes.harmonifuse.interleave import is_padding

    dirs = _subsets(msp_manifests, libri_manifests, tmp_path)
    h = {"train_tasks": ["asr", "ser"], "ser_extra_sources": {}, "interleave_ratio": {"asr": 1, "ser": 1},
         "interleave_length": "max", "interleave_order": "shuffle", "seed": 1, "num_workers": 0,
         "dynamic_batching": False, "asr_batch_size": 3, "ser_batch_size": 3, "libri_prep_folder": str(dirs["libri"]),
         "libri_train_splits": ["train-clean-100"], "libri_valid_split": "dev-clean", "libri_test_splits": ["test-clean"],
         "msp_prep_folder": str(dirs["msp"]), "ser_corpus": "msp_podcast", "iemocap_fold": 1, "emotion_classes": CLASSES}
    datasets = HD.build_datasets(h)

    def run(rank, world, epoch):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        train = HD.make_loaders(h, datasets)[0]
        train.batch_sampler.set_epoch(epoch)
        return [(str(batch_task(b)), list(b.id), is_padding(b)) for b in train]

    for epoch in (0, 1):
        one, r0, r1 = run(0, 1, epoch), run(0, 2, epoch), run(1, 2, epoch)
        assert len(one) == len(r0) == len(r1) == 6                          # a step is a global batch
        assert [t for t, _, _ in r0] == [t for t, _, _ in r1] == [t for t, _, _ in one]
        assert sorted(t for t, _, _ in one) == ["asr"] * 3 + ["ser"] * 3
        for (_, ids, _), (_, a, pad_a), (_, b, pad_b) in zip(one, r0, r1):
            assert not pad_a and len(a) == (len(ids) + 1) // 2              # contiguous shares, rank 0 the longer
            combined = a + ([] if pad_b else b)
            D.check_ids(combined, ids, "the ranks' shares of a step")      # none dropped or duplicated
            assert combined == ids
            assert pad_b == (len(ids) == 1) and (not pad_b or b == ids[:1])
        sizes = sorted(len(ids) for _, ids, _ in one)
        assert sizes == [1, 3, 3, 3, 3, 3]                                  # the SER pass ends with one utterance
    assert run(0, 1, 0) != run(0, 1, 1)                                     # each epoch its own shuffle
    # 3 ranks: uneven shares (1 + 1 + 1 of 3), an int length counts steps, the same for any world size
    h.update(interleave_length=4, interleave_order="round_robin")
    one, shares = run(0, 1, 0), [run(r, 3, 0) for r in range(3)]
    assert [t for t, _, _ in one] == ["asr", "ser"] * 2 and all(len(s) == 4 for s in shares)
    for k, (_, ids, _) in enumerate(one):
        assert [u for s in shares for u in s[k][1]] == ids
    # dynamic batching (seconds per step, global): the same shares of the single-process batches
    h.update(dynamic_batching=True, max_batch_length_asr=20.0, max_batch_length_ser=20.0, num_buckets=2,
             max_batch_ex=None, interleave_length="min")
    one, r0, r1 = run(0, 1, 0), run(0, 2, 0), run(1, 2, 0)
    assert len(one) == len(r0) == len(r1) >= 2
    for (t, ids, _), (t0, a, _), (t1, b, pad_b) in zip(one, r0, r1):
        assert t == t0 == t1 and a + ([] if pad_b else b) == ids


def _train_log_losses(folder):
    """The training stats of the epoch line: {'loss': ..., 'loss_asr': ..., 'loss_ser': ...}."""
    line = next(x for x in (folder / "train_log.txt").read_text().splitlines() if x.startswith("epoch: 1"))
    train = line.split(" - ")[1]
    return {k: float(v) for k, v in re.findall(r"(loss\w*): ([-\d.e]+)", train)}


def test_two_gloo_processes_train_the_weights_of_one(mini_corpora, msp_manifests, libri_manifests, tmp_path):
    """The `full` row (LoRA LM, fine-tuned WavLM, dynamic fusion, AdamW) for 6 steps of global batches of 3:
    2 gloo processes end with the trainable weights of 1 process (max abs difference <= 1e-6), having moved them
    by far more, and log the same training losses."""
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm, lm = make_tiny_wavlm(tmp_path / "wavlm"), make_tiny_lm(tmp_path / "lm")
    dirs = _subsets(msp_manifests, libri_manifests, tmp_path)
    # float64 everywhere: the default dtype (every module the recipe builds) and the audio the loader reads
    wrapper = tmp_path / "float64_train.py"
    wrapper.write_text(
        "import runpy, sys\nimport torch\ntorch.set_default_dtype(torch.float64)\nimport lobes.dataio as dataio\n"
        "read = dataio.read_audio\ndataio.read_audio = lambda *a, **k: read(*a, **k).to(torch.float64)\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = [str(wrapper), str(RECIPE / "train.py"), str(RECIPE / "hparams/rows/full.yaml"),
            "--msp_folder", str(mini_corpora.msp), "--libri_folder", str(mini_corpora.libri), "--skip_prep=True",
            f"--msp_prep_folder={dirs['msp']}", f"--libri_prep_folder={dirs['libri']}", f"--wavlm_source={wavlm}",
            f"--lm_source={lm}", "--lm_dtype=!name:torch.float64", "--lora_dropout=0.0", "--number_of_epochs=1",
            "--asr_batch_size=3", "--ser_batch_size=3", "--interleave_order=shuffle", "--lr=0.01",
            "--lr_backbone=0.001", "--asr_max_decode_len=2", "--ser_max_decode_len=2", "--num_bootstraps=2",
            "--device=cpu", "--noprogressbar"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {1: tmp_path / "exp1", 2: tmp_path / "exp2"}
    procs = {}
    for nproc, out in runs.items():  # both at once: 3 processes share the cores, most of them start-up
        launch = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        extra = [] if nproc == 1 else ["--distributed_backend=gloo"]
        procs[nproc] = subprocess.Popen([*launch, *args, f"--output_folder={out}", *extra], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for proc in procs.values():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    states = {n: load_file(str(next((out / "save").glob("CKPT+*")) / "speech_lm.ckpt")) for n, out in runs.items()}
    one, two = states[1], states[2]
    assert sorted(one) == sorted(two) and len(one) > 10
    diff = {k: float(np.abs(one[k].numpy() - two[k].numpy()).max()) for k in one}
    print("max abs difference 1 vs 2 processes:", max(diff.values()), max(diff, key=diff.get))
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 8 for t in one.values())   # float64 throughout
    assert max(diff.values()) <= 1e-6, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    assert float(np.abs(one["encoder_fusion.layer_logits"].numpy()).max()) > 1e-3       # training moved it
    log2 = (runs[2] / "train_log.txt").read_text()
    assert "train batches: [6, 6]" in log2                                 # a step = one global batch
    l1, l2 = _train_log_losses(runs[1]), _train_log_losses(runs[2])
    assert set(l1) == {"loss", "loss_asr", "loss_ser"} and l1 == pytest.approx(l2, abs=2e-4)  # logs: 4 decimals


@pytest.mark.parametrize("mode,task,soft", [("generate", "asr", False), ("generate", "ser", False),
                                            ("generate", "ser", True), ("classify", "ser", False),
                                            ("classify", "ser", True)])
def test_share_counts_are_the_loss_denominators_of_the_model(tmp_path_factory, mode, task, soft):
    """Σ_r n_r · loss(share r) / Σ_r n_r = loss(whole batch) with n_r = share_count: the count is what the model's
    loss averages over (target tokens with EOS, Σ p · tokens with soft labels, utterances for the classify
    head), so DDP's average of the weighted shares is the single-process loss. Uneven target lengths: weighting
    by utterances instead of tokens would be off."""
    import torch

    from lobes.harmonifuse.speech_lm import SpeechLM
    from lobes.harmonifuse.task_losses import share_count
    from tests.toy_encoder import ToyEncoder
    from tools.make_tiny_lm import make_tiny_lm

    emotions = ["Anger", "Happiness", "Neutral", "Sadness"]
    lm = make_tiny_lm(tmp_path_factory.getbasetemp() / "share_count_lm")
    torch.manual_seed(0)
    m = SpeechLM(ToyEncoder(num_layers=2, seed=0), str(lm), ser={"mode": mode, "emotions": emotions}).eval()
    wavs, lens = torch.randn(3, 800), torch.ones(3)
    targets = ["A CAT", "THE DOG RAN FAR AWAY", "HI"] if task == "asr" else ["Anger", "Happiness", "Sadness"]
    p = torch.tensor([[0.25, 0.75, 0, 0], [0, 0, 0.4, 0.6], [1.0, 0, 0, 0]]) if soft else None
    whole = m(wavs, lens, task, None if soft else targets, soft_targets=p).loss.item()
    num = den = 0.0
    for share in (slice(0, 2), slice(2, 3)):
        kw = {"soft_targets": p[share]} if soft else {}
        n = share_count(m, task, targets[share], None if p is None else p[share])
        num += n * m(wavs[share], lens[share], task, None if soft else targets[share], **kw).loss.item()
        den += n
    expected = {("generate", "asr"): (5 + 1) + (20 + 1) + (2 + 1), ("generate", "ser"): 6 + 10 + 8,
                ("classify", "ser"): 3}[(mode, task)]
    if soft and mode == "generate":  # Σ p (len(word) + EOS)
        expected = 0.25 * 6 + 0.75 * 10 + 0.4 * 8 + 0.6 * 8 + 1.0 * 6
    assert den == pytest.approx(expected, abs=1e-6)
    assert num / den == pytest.approx(whole, rel=1e-6, abs=1e-7)
