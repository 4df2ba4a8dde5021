"""Multi-GPU semantics (lobes/distributed.py, lobes/brains.py) and the frozen CNN (lobes/wavlm_encoder.py).

- the global batch: micro x accumulation x GPUs stays the recipe's ``batch_size`` for 1, 2 and 4 processes;
  a split that does not divide is an error naming the keys;
- gradient accumulation over k micro-batches gives the update of one k-times-larger batch (clipping active);
- 2 gloo processes on the CPU (torch.multiprocessing) take the same optimizer steps per epoch as one process and
  end with the same weights; sharded evaluation gathers every utterance once, in single-process order, with the
  sample-weighted loss of one process;
- the SER recipe's train.py under ``torchrun --nproc_per_node=2`` (gloo) writes the metrics.json of one process;
- the fine-tuning encoder's frozen CNN keeps no activation for backward.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch

from lobes import distributed as D
from lobes.brains import ToolkitBrain
from lobes.collectors import ASRCollector, Collector
from lobes.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------------- global batch
@pytest.mark.parametrize("world, micro, expected", [(1, 8, (8, 4)), (2, 8, (8, 2)), (4, 8, (8, 1)),
                                                    (1, None, (32, 1)), (2, None, (16, 1)), (2, 4, (4, 4))])
def test_global_batch_is_constant_over_world_sizes(world, micro, expected):
    got = D.batch_split(32, micro, world=world)
    assert got == expected
    assert got[0] * got[1] * world == 32


def test_dynamic_batching_splits_seconds_the_same_way():
    assert D.batch_split(None, None, True, 200, 50, world=2) == (50, 2)
    assert D.batch_split(None, None, True, 200, None, world=2) == (100.0, 1)
    with pytest.raises(DataError, match="max_batch_length 200 .* micro_batch_length 60"):
        D.batch_split(None, None, True, 200, 60, world=2)


@pytest.mark.parametrize("batch, micro, world, message", [
    (32, 12, 2, "batch_size 32 \\(global\\) is not micro_batch_size 12 x 2 GPU\\(s\\) x an integer"),
    (32, 32, 2, "set micro_batch_size to a divisor of batch_size / GPUs = 16"),
    (7, None, 2, "batch_size 7 \\(global\\) does not divide over 2 GPUs"),
    (0, None, 1, "batch_size: 0 must be a positive integer"),
])
def test_a_global_batch_that_does_not_divide_is_an_error_naming_the_keys(batch, micro, world, message):
    with pytest.raises(DataError, match=message):
        D.batch_split(batch, micro, world=world)


def test_the_recipe_yaml_derives_the_accumulation_factor_and_logs_the_split(monkeypatch):
    from lobes.hparams_io import load_hparams

    ser = ROOT / "recipes/MSP-Podcast/ser/hparams/train_ser.yaml"
    text = ser.read_text()
    for key in ("batch_size:", "micro_batch_size:", "micro_batch_length:", "grad_accumulation_factor:",
                "max_grad_norm:"):
        assert f"\n{key}" in text
    # every recipe YAML declares clipping and accumulation (issue 16 item 3)
    for f in ROOT.glob("recipes/*/*/hparams/*.yaml"):
        t = f.read_text()
        assert "\nmax_grad_norm:" in t and "\ngrad_accumulation_factor:" in t, f
    # hyperpyyaml resolves the !apply with WORLD_SIZE of torchrun (the wavlm entry is not needed for this)
    monkeypatch.setenv("WORLD_SIZE", "2")
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("micro_batch_size:"))
    last = next(i for i, line in enumerate(lines) if line.startswith("max_grad_norm:"))
    block = "\n".join(lines[first:last + 1])
    from hyperpyyaml import load_hyperpyyaml

    h = load_hyperpyyaml("batch_size: 8\ndynamic_batching: False\nmax_batch_length: 120\n" + block,
                         {"batch_size": 32, "micro_batch_size": 8})
    assert h["grad_accumulation_factor"] == 2 and h["max_grad_norm"] == 5.0
    assert D.describe_batch(h, 2) == "global batch 32 = micro 8 x accum 2 x 2 GPUs"
    with pytest.raises(DataError, match="grad_accumulation_factor 3 does not give the global batch"):
        D.check_batch(h, 3)
    assert load_hparams  # the row loader reads the same file (used by every train.py)


# --------------------------------------------------------------------------- a toy Brain for training tests
N_FEAT = 5


def toy_dataset(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, N_FEAT, generator=g), torch.randn(N_FEAT, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    data = {f"u{i:03d}": {"x": x[i].tolist(), "y": y[i].tolist(), "duration": 1.0} for i in range(n)}
    ds = sb.dataio.dataset.DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("x", "y")
    @sb.utils.data_pipeline.provides("xt", "yt")
    def pipeline(x, y):
        yield torch.tensor(x)
        yield torch.tensor(y)

    ds.add_dynamic_item(pipeline)
    ds.set_output_keys(["id", "xt", "yt"])
    return ds


class ToyBrain(ToolkitBrain):
    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.out, self.asr = Collector("toy", ["pred"]), ASRCollector()

    def compute_forward(self, batch, stage):
        return self.modules.net(batch.xt.data)

    def compute_objectives(self, pred, batch, stage):
        if stage != sb.Stage.TRAIN:
            keep = [i for i, u in enumerate(batch.id) if u not in self.drop]  # a collector that loses rows
            self.out.add(ids=[batch.id[i] for i in keep], pred=[pred.view(-1)[i].item() for i in keep])
            self.asr.add(ids=batch.id, refs=[f"REF {u}" for u in batch.id],  # ASR rows are gathered the same way
                         hyps=[f"{v:.3f}" for v in pred.view(-1).tolist()])
        return torch.nn.functional.mse_loss(pred, batch.yt.data)  # a per-sample mean: batch-size invariant

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.optimizer_steps_per_epoch = self.optimizer_step
            return
        local = self.shards.count  # utterances this rank ran itself
        self.gather(self.out, self.asr)
        self.eval_result = {"local": local, "ids": self.out["ids"], "pred": self.out["pred"],
                            "asr": [self.asr["ids"], self.asr["refs"], self.asr["hyps"]],
                            "loss": self.stage_loss(stage, stage_loss)}


class _NoTrainLog:
    """Recipes log through ``train_logger``; the toy runs keep nothing."""

    def log_stats(self, *args, **kwargs):
        pass


def toy_hparams(batch, micro, world, max_grad_norm=0.05):
    h = {"train_logger": _NoTrainLog(), "use_tensorboard": False, "use_wandb": False, "lr_schedulers": {},
         "train_log": "unused", "curves_plot": None, "output_folder": "unused",
         "batch_size": batch, "micro_batch_size": micro, "dynamic_batching": False, "max_batch_length": 1.0,
         "micro_batch_length": None, "sorting": "ascending", "num_workers": 0, "backbone_modules": [],
         "backbone_opt_class": None, "max_grad_norm": max_grad_norm, "emotion_classes": []}
    h["grad_accumulation_factor"] = D.batch_split(batch, micro, world=world)[1]
    return h


def run_toy(batch, micro, world, n_train, n_eval, eval_batch, drop=()):
    from lobes.dataio import loader_kwargs

    torch.manual_seed(0)
    h = toy_hparams(batch, micro, world)
    net = torch.nn.Linear(N_FEAT, 1)
    brain = ToyBrain(modules={"net": net}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1), hparams=h,
                     run_opts={"device": "cpu", "distributed_backend": "gloo", "noprogressbar": True})
    brain.drop = set(drop)
    counter = sb.utils.epoch_loop.EpochCounter(1)
    train = toy_dataset(n_train)
    brain.fit(counter, train, train_loader_kwargs=loader_kwargs(h, train, train=True))
    brain.evaluate(toy_dataset(n_eval, seed=1), test_loader_kwargs={"batch_size": eval_batch})
    raw = brain.modules.net.module if hasattr(brain.modules.net, "module") else brain.modules.net
    return {"steps": brain.optimizer_steps_per_epoch, "weight": raw.weight.detach().view(-1).tolist(),
            "bias": raw.bias.item(), "eval": brain.eval_result, "description": brain.batch_description}


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    # 32 utterances: one batch of 32, or 4 micro-batches of 8 accumulated; clipping (0.05) active in both
    one = run_toy(32, 32, 1, 32, 4, 4)
    accum = run_toy(32, 8, 1, 32, 4, 4)
    assert one["steps"] == accum["steps"] == 1
    assert accum["description"] == "global batch 32 = micro 8 x accum 4 x 1 GPU"
    assert accum["weight"] == pytest.approx(one["weight"], abs=1e-6)
    assert accum["bias"] == pytest.approx(one["bias"], abs=1e-6)
    torch.manual_seed(0)
    start = torch.nn.Linear(N_FEAT, 1)  # run_toy's initial weights
    moved = sum(abs(a - b) for a, b in zip(one["weight"], start.weight.view(-1).tolist()))
    assert moved > 1e-3  # the step changed the weights (the comparison is not between two untouched models)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, args):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run_toy(*args)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()  # no rank tears down while the other still talks to it
    finally:
        D.release_process_group()  # and nothing holding the group is left for interpreter finalization


def test_two_gloo_processes_step_like_one_and_shard_evaluation(tmp_path):
    # global batch 16 = micro 4 x accum 4 (1 process) = micro 4 x accum 2 x 2 processes; 64 utterances: 4 steps.
    # Evaluation: 10 utterances in batches of 4 -> [4, 4, 2]; rank 0 runs batches 0 and 2, rank 1 batch 1.
    args = (16, 4, 2, 64, 10, 4)
    single = run_toy(16, 4, 1, 64, 10, 4)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path), args), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["steps"] == 4 and single["eval"]["local"] == 10
    assert single["description"] == "global batch 16 = micro 4 x accum 4 x 1 GPU"
    for r in ranks:
        assert r["description"] == "global batch 16 = micro 4 x accum 2 x 2 GPUs"
        assert r["steps"] == single["steps"]
        # DDP's strided shards of an unshuffled set make each step's global batch the same 16 utterances
        assert r["weight"] == pytest.approx(single["weight"], abs=1e-5)
        assert r["bias"] == pytest.approx(single["bias"], abs=1e-5)
        # every evaluation utterance exactly once, in single-process order, with the same predictions and loss
        assert r["eval"]["local"] == [6, 4][ranks.index(r)]  # sharded: rank 0 ran 4 + 2, rank 1 ran 4
        assert r["eval"]["ids"] == single["eval"]["ids"] == [f"u{i:03d}" for i in range(10)]
        assert r["eval"]["pred"] == pytest.approx(single["eval"]["pred"], abs=1e-5)
        assert r["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=1e-6)
        assert r["eval"]["asr"][:2] == single["eval"]["asr"][:2] and len(r["eval"]["asr"][2]) == 10


def test_shard_batches_cover_every_utterance_once():
    ds = toy_dataset(11)
    kw = {"batch_size": 3, "shuffle": False, "num_workers": 0}
    shards = [D.shard_batches(ds, kw, rank_=r, world=3) for r in range(3)]
    batches = [list(s[0]["batch_sampler"]) for s in shards]
    assert batches == [[[0, 1, 2], [9, 10]], [[3, 4, 5]], [[6, 7, 8]]]
    assert shards[0][1] == [f"u{i:03d}" for i in range(11)]
    assert "batch_size" not in shards[0][0] and shards[0][0]["num_workers"] == 0


# ------------------------------------------------------ gathered outputs are the evaluated set (issue 22 item 6)
def _ranks(monkeypatch, parts):
    """Simulate a 2-rank all_gather_object: every rank receives ``parts``."""
    monkeypatch.setattr(D, "all_gather", lambda obj: parts)
    return parts[0]


def test_a_gathered_set_missing_an_utterance_fails_loudly_naming_it(monkeypatch):
    order = [f"u{i}" for i in range(6)]  # batches of 2: rank 0 ran [u0, u1] and [u4, u5], rank 1 [u2, u3]
    mine = _ranks(monkeypatch, [{"ids": ["u0", "u1", "u5"], "pred": [0, 1, 5]},   # rank 0 lost u4
                                {"ids": ["u2", "u3"], "pred": [2, 3]}])
    with pytest.raises(DataError, match=r"gathered ser do not cover the 6 evaluated utterances once each: "
                                        r"missing 1: \['u4'\]"):
        D.gather_rows(mine, order, what="ser")
    mine = _ranks(monkeypatch, [{"ids": ["u0", "u1", "u4", "u5"], "pred": [0, 1, 4, 5]},
                                {"ids": ["u2", "u3"], "pred": [2, 3]}])
    assert D.gather_rows(mine, order) == {"ids": order, "pred": [0, 1, 2, 3, 4, 5]}


def test_a_gathered_duplicate_stranger_or_subset_fails_loudly(monkeypatch):
    order = [f"u{i}" for i in range(4)]
    mine = _ranks(monkeypatch, [{"ids": ["u0", "u1"], "loss": [0.5, 0.25]}, {"ids": ["u1", "u2", "u3"],
                                                                          "loss": [1, 2, 3]}])
    with pytest.raises(DataError, match=r"duplicated 1: \['u1'\]"):  # was kept once, silently
        D.gather_rows(mine, order)
    mine = _ranks(monkeypatch, [{"ids": ["u0", "u1"], "loss": [0.5, 1]}, {"ids": ["u2", "x9"], "loss": [1, 2]}])
    with pytest.raises(DataError, match=r"missing 1: \['u3'\]; not in the evaluated set 1: \['x9'\]"):
        D.gather_rows(mine, order)
    # one row per batch (a subset of the evaluated set) is no longer a valid gather: per-utterance rows only
    mine = _ranks(monkeypatch, [{"ids": ["u2"], "loss": [0.5]}, {"ids": ["u0"], "loss": [1]}])
    with pytest.raises(DataError, match=r"gathered outputs do not cover the 4 evaluated utterances once each: "
                                        r"missing 2: \['u1', 'u3'\]"):
        D.gather_rows(mine, order)
    mine = _ranks(monkeypatch, [{"ids": ["u2", "u3"], "loss": [0.5, 0.5]}, {"ids": ["u0", "u1"], "loss": [1, 1]}])
    assert D.gather_rows(mine, order) == {"ids": order, "loss": [1, 1, 0.5, 0.5]}


def test_a_brain_whose_collector_drops_an_utterance_fails_at_the_stage_end():
    with pytest.raises(DataError, match=r"gathered toy do not cover the 10 evaluated utterances once each: "
                                        r"missing 1: \['u007'\]"):
        run_toy(16, 4, 1, 16, 10, 4, drop=("u007",))


def test_evaluation_batches_that_skip_or_repeat_an_utterance_are_refused():
    ds = toy_dataset(5)
    with pytest.raises(DataError, match=r"evaluation batches do not cover the 5 evaluated utterances once each: "
                                        r"missing 1: \['u002'\]"):
        D.shard_batches(ds, {"batch_sampler": [[0, 1], [3, 4]]}, rank_=0, world=2)
    with pytest.raises(DataError, match=r"duplicated 1: \['u001'\]"):
        D.shard_batches(ds, {"batch_sampler": [[0, 1], [1, 2, 3, 4]]}, rank_=0, world=2)


# ----------------------------------------------------------------------------------------- the SER recipe
SER = ROOT / "recipes/MSP-Podcast/ser"
SUBSET = {"train": 8, "valid": 6, "test": 7}


def test_ser_recipe_on_two_gloo_processes_writes_the_metrics_of_one(msp_manifests, tmp_path):
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm = make_tiny_wavlm(tmp_path / "tiny_wavlm")
    prep = tmp_path / "prep"
    prep.mkdir()
    for split, n in SUBSET.items():
        man = json.loads((msp_manifests / f"{split}.json").read_text())
        (prep / f"{split}.json").write_text(json.dumps({k: man[k] for k in sorted(man)[:n]}))

    def run(exp, nproc):
        # learning rates 0: training runs (DDP, accumulation) but cannot move the weights, so both runs evaluate
        # the same model and any difference comes from how evaluation is split across ranks
        args = [str(SER / "train.py"), str(SER / "hparams/train_ser.yaml"), f"--data_folder={tmp_path}/unused",
                f"--prep_folder={prep}", "--skip_prep=True", f"--wavlm_source={wavlm}", f"--output_folder={exp}",
                "--number_of_epochs=1", "--batch_size=4", "--micro_batch_size=2", "--lr=0", "--lr_wavlm=0",
                "--head_hidden=8", "--num_bootstraps=20", "--device=cpu", "--noprogressbar"]
        cmd = [sys.executable] + args if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *args, "--distributed_backend=gloo"]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads((exp / "metrics.json").read_text()), exp

    one, exp1 = run(tmp_path / "one", 1)
    two, exp2 = run(tmp_path / "two", 2)
    assert "global batch 4 = micro 2 x accum 2 x 1 GPU" in (exp1 / "log.txt").read_text()
    assert "global batch 4 = micro 2 x accum 1 x 2 GPUs" in (exp2 / "log.txt").read_text()
    assert one["test"]["n"] == two["test"]["n"] == SUBSET["test"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    for k in ("uar", "macro_f1", "accuracy", "uar_ci", "macro_f1_ci"):
        assert two["test"][k] == pytest.approx(one["test"][k], abs=1e-12), k
    assert two["alphas"] == pytest.approx(one["alphas"], abs=1e-7)
    assert (exp2 / "predictions.csv").read_text().splitlines()[0] == (exp1 / "predictions.csv").read_text().splitlines()[0]
    ids = lambda e: [line.split(",")[0] for line in (e / "predictions.csv").read_text().splitlines()[1:]]
    assert ids(exp2) == ids(exp1) and len(ids(exp1)) == SUBSET["test"]


# ----------------------------------------------------------------------------------------- frozen CNN
def test_frozen_cnn_saves_no_activation_for_backward(tmp_path):
    from lobes.wavlm_encoder import WavLMEncoder
    from tools.make_tiny_wavlm import make_tiny_wavlm

    enc = WavLMEncoder(str(make_tiny_wavlm(tmp_path / "tiny_wavlm")), freeze_feature_extractor=True).train()
    cnn = enc.model.feature_extractor
    assert not any(p.requires_grad for p in cnn.parameters())
    cnn_out = {}
    cnn.register_forward_hook(lambda m, i, o: cnn_out.setdefault("t", o))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        hidden, _ = enc(torch.randn(2, 16000), torch.ones(2))
    assert cnn_out["t"].grad_fn is None and not cnn_out["t"].requires_grad  # no CNN graph at all
    # nothing the size of a CNN activation ([B, 512-ish channels, frames] at > 49 frames/s) is kept
    n_frames_first_conv = (16000 - 10) // 5 + 1
    assert all(n_frames_first_conv not in tuple(s) for s in saved)
    hidden.sum().backward()
    assert enc.model.encoder.layers[0].attention.q_proj.weight.grad is not None  # the transformer still trains

    # the old way (requires_grad_(False) only) records the CNN: the check above would fail on it
    cnn._requires_grad = True
    cnn_out.clear()
    enc(torch.randn(2, 16000), torch.ones(2))
    assert cnn_out["t"].grad_fn is not None


def test_dynamic_batches_are_per_gpu_micro_batches_and_shard_without_duplicates(monkeypatch):
    from lobes.dataio import loader_kwargs

    monkeypatch.setenv("WORLD_SIZE", "2")
    h = toy_hparams(8, None, 2)
    h.update({"dynamic_batching": True, "max_batch_length": 8.0, "micro_batch_length": 2.0, "num_buckets": 1,
              "max_batch_ex": None})
    assert D.batch_split(None, None, True, 8.0, 2.0, world=2) == (2.0, 2)
    ds = toy_dataset(11)  # 1 s each: dynamic batches of at most 2 s = 2 utterances per GPU
    kw = loader_kwargs(h, ds, train=False)
    assert all(len(b) <= 2 for b in kw["batch_sampler"]) and sum(len(b) for b in kw["batch_sampler"]) == 11
    shards = [D.shard_batches(ds, kw, rank_=r, world=2) for r in range(2)]
    seen = sorted(i for s in shards for b in s[0]["batch_sampler"] for i in b)
    assert seen == list(range(11))
    assert sorted(shards[0][1]) == [f"u{i:03d}" for i in range(11)]


def test_ranks_leave_together_so_the_main_process_can_finish_its_files(tmp_path):
    """Rank 1 has nothing left to do while rank 0 still writes (metrics, plots, exports): with
    finish_together_at_exit, rank 1's exit waits for rank 0's (a lone exit with the gloo group alive can abort and
    make torchrun kill rank 0 before its files exist)."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import atexit, os, sys, time\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from lobes import distributed as D\n"
        "out, rank = Path(sys.argv[1]), int(os.environ['RANK'])\n"
        "# registered first, so it runs last (atexit is LIFO): what this rank saw when it really left\n"
        "atexit.register(lambda: (out / f'rank{rank}.txt').write_text(str((out / 'main_done').exists())))\n"
        "torch.distributed.init_process_group('gloo')\n"
        "D.finish_together_at_exit()\n"
        "if rank == 0:\n"
        "    time.sleep(2)\n"
        "    (out / 'main_done').write_text('written')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank1.txt").read_text() == "True"
    assert not torch.distributed.is_initialized()  # the pytest process itself never joined a group
    # a rank that dies of an exception leaves at once (no exit barrier that the others, busy elsewhere, never join)
    script.write_text(script.read_text().replace("if rank == 0:", "if rank == 1:\n    raise RuntimeError('rank 1 "
                                                 "fails')\nif rank == 0:\n    torch.distributed.barrier()"))
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "rank 1 fails" in proc.stderr
