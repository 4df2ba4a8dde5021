"""tools/plan_memory.py (issue 13.3): live-memory tracking, meta == real device, autocast emulation, plans.
The CPU validation against measured peaks (≤ 15%) is benchmarks/bench_plan_memory.py (benchmarks/RESULTS.md)."""
import json

import pytest
import torch

from tools import plan_memory as PM

ROW = "recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml"
TINY = json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "do_stable_layer_norm": True, "feat_extract_norm": "layer", "conv_bias": True,
                   "conv_dim": [32] * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4})
SETTINGS = {"num_vectors": 2, "lambda_mode": "layerwise", "merge_impl": "materialized", "delta_dtype": None,
            "gradient_checkpointing": False, "precision": "fp32", "head_hidden": 16, "pooling": "mean",
            "batch_size": 32}


def test_live_memory_counts_saved_and_freed_tensors():
    w = torch.randn(256, 256, requires_grad=True)  # created outside: never counted
    x = torch.randn(64, 256)
    m = PM.LiveMemory()
    with m:
        h = x @ w               # 64 kB, not saved by tanh (it saves its output)
        a = torch.tanh(h)       # 64 kB, saved
        del h
        b = torch.tanh(a)
        del a
        view = b.t()            # a view: no new memory
        assert m.live == m.peak == 2 * 64 * 256 * 4  # a (saved by its tanh) and b; h died before b came
        del view
        b.sum().backward()
    assert m.largest == 256 * 256 * 4  # w.grad
    assert m.live == 256 * 256 * 4 + 64 * 256 * 4  # w.grad and b (still referenced); backward freed a


def test_meta_run_allocates_exactly_like_the_cpu_run():
    """The same two training steps on meta and on the CPU create and free the same tensors."""
    out = {}
    for device in ("meta", "cpu"):
        modules = PM.build_adaltm(PM.wavlm_config(TINY), 2, merge_impl="fused", gradient_checkpointing="cnn",
                                  head_hidden=16, device=device)
        out[device] = PM.train_steps(modules, 2, 0.3, device=device)
        out[device]["model"] = PM.model_bytes(modules)[0]
    assert out["meta"] == out["cpu"]
    assert out["meta"]["dynamic_peak"] > out["meta"]["saved_for_backward"] > 0


def test_peak_is_affine_in_the_micro_batch():
    peaks = [PM.predict(SETTINGS, b, 0.5, shape=TINY)["peak"] for b in (1, 2, 4)]
    # plans extrapolate from batch 1 and 2 (and confirm the pick directly): within 1% at 4
    assert peaks[2] == pytest.approx(peaks[0] + 3 * (peaks[1] - peaks[0]), rel=0.01)
    assert peaks[1] - peaks[0] > 0.4 * peaks[0]  # activations dominate even at this size


def test_emulated_autocast_casts_like_cuda_autocast():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    saved = PM.SavedBytes(exclude=[])
    with saved, PM.EmulatedAutocast("cuda"):
        y = lin(x)
        p = torch.softmax(y, dim=-1)
        again = lin(x)
    assert y.dtype == torch.bfloat16 and p.dtype == torch.float32 and again.dtype == torch.bfloat16
    # x needs no grad, so linear saves only its bf16 x (cast anew per call), softmax its fp32 output
    assert saved.total == 2 * 8 * 64 * 2 + 8 * 64 * 4
    x.requires_grad_(True)  # now W is saved too; casts of leaves requiring grad are cached: one copy each
    saved = PM.SavedBytes(exclude=[])
    with saved, PM.EmulatedAutocast("cuda"):
        lin(x), lin(x)
    assert saved.total == 8 * 64 * 2 + 64 * 64 * 2
    with PM.EmulatedAutocast("cpu"):
        assert torch.softmax(lin(x), dim=-1).dtype == torch.bfloat16  # CPU autocast keeps softmax in bf16


def test_model_bytes_of_the_merge_options():
    """Materialized keeps one more copy of W than fused; bf16 ΔW halve the task vectors. Exact bytes."""
    cfg = PM.wavlm_config(TINY)
    w = sum(p.numel() for p in PM.build_adaltm(cfg, 0, device="meta")[0].parameters())  # W_base
    sizes = {(impl, dt): PM.model_bytes(PM.build_adaltm(cfg, 2, merge_impl=impl, delta_dtype=dt, device="meta"))[0]
             for impl, dt in (("materialized", None), ("fused", None), ("fused", torch.bfloat16))}
    assert sizes["materialized", None] - sizes["fused", None] == 4 * w
    assert sizes["fused", None] - sizes["fused", torch.bfloat16] == 2 * 2 * w
    # at WavLM-Large shape (meta: no compute, no memory): W, its copy and two ΔW = 4 x 315M fp32
    large = PM.model_bytes(PM.build_adaltm(PM.wavlm_config("large"), 2, device="meta"))[0]
    assert large / PM.GIB == pytest.approx(4 * 315.46e6 * 4 / PM.GIB, rel=2e-3)


TINY_LM = json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2})
HF_YAML = "recipes/MSP-Podcast/harmonifuse/hparams/harmonifuse.yaml"


def test_cli_plans_any_recipe_through_its_brain(tmp_path, capsys):
    """tools.plan_memory on a non-AdaLTM YAML: the recipe's own Brain (SERBrain) on meta; the printed and saved
    prediction is BrainPredictor's, and each GPU setup gets micro_batch_size: auto's plan."""
    from lobes.memory_plan import BrainPredictor, peak_bytes, plan_micro_batch

    yaml = "recipes/MSP-Podcast/ser/hparams/train_ser.yaml"
    out = PM.main([yaml, "--batch", "2", "--max_duration", "0.5", "--shape", TINY, "--plans",
                   "--json", str(tmp_path / "p.json")])
    assert out["brain"] == "SERBrain" and "per GPU" in capsys.readouterr().out
    hparams, brain = PM.load_meta_recipe(yaml, shape=TINY)
    pred = BrainPredictor(hparams, brain, item=PM.synthetic_item(hparams, 0.5), seconds=0.5)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["predictions"]["None"]["dynamic_peak"] == out["predictions"]["None"]["dynamic_peak"] == \
        pred(2)["dynamic_peak"]
    assert [p["plan"] for p in out["plans"]] == [
        plan_micro_batch(pred, hparams["batch_size"], gpus, gb * 1e9 - 0.5 * PM.GIB) for gpus, gb in PM.GPU_SETUPS]
    assert peak_bytes(pred(2), 1, 2) - peak_bytes(pred(2), 1, 1) == pred(2)["trainable"]  # DDP buckets


class _Items:
    """A training set of ready elements (what longest_item reads: ``data`` durations, ``data_ids``, items)."""

    def __init__(self, *items_seconds):
        self.items = [i for i, _ in items_seconds]
        self.data = {i["id"]: {"duration": s} for i, s in items_seconds}
        self.data_ids = list(self.data)

    def __getitem__(self, k):
        return self.items[k]


@pytest.fixture(scope="module")
def harmonifuse_meta():
    """HarmoniFuse (LoRA LM) at tiny shape on meta, its Brain, and per task a training set whose longest
    utterance is 2 s (ASR) / 1.5 s (SER)."""
    hparams, brain = PM.load_meta_recipe(HF_YAML, shape=TINY, lm_shape=TINY_LM)
    assert brain.__name__ == "HarmoniFuseBrain" and hparams["micro_batch_size"] == "auto"  # the default
    sets = {task: _Items((PM.synthetic_item(hparams, 1.0, task, 0), 1.0), (PM.synthetic_item(hparams, s, task, 1), s))
            for task, s in (("asr", 2.0), ("ser", 1.5))}
    return hparams, brain, sets


def test_harmonifuse_auto_checks_each_task_batch(harmonifuse_meta, monkeypatch, caplog):
    """One task batch per optimizer step, no accumulation: a GPU where ASR batch 8 does not fit is refused,
    naming the largest ASR batch that fits (3); with room for both, the plan line names both batches."""
    import logging

    from lobes.memory_plan import GIB, MARGIN, OVERHEAD, BrainPredictor, MemoryPlanError, resolve_task_batches

    hparams, brain, sets = harmonifuse_meta
    asr = BrainPredictor(hparams, brain, sets["asr"])
    ser = BrainPredictor(hparams, brain, sets["ser"])
    assert (asr.seconds, ser.seconds) == (2.0, 1.5)  # the longest of each task

    def peak(pred, b):
        return pred(b)["model"] + pred(b)["dynamic_peak"] + pred(b)["kernel_temp"]
    assert peak(asr, 4) > peak(asr, 3) > peak(ser, 1)
    h = dict(hparams, ser_batch_size=1)
    free = int(peak(asr, 3) * (1 + MARGIN) + OVERHEAD) + 1  # ASR 3 fits, 4 does not
    _gpu(monkeypatch, (free + CONTEXT) / 1e9, "small GPU")
    with pytest.raises(MemoryPlanError) as err:
        resolve_task_batches(h, {"device": "cuda:0"}, brain, sets, predictors={"asr": asr, "ser": ser})
    msg = str(err.value)
    assert msg.startswith(f"memory plan: asr_batch_size 8 of 2.0 s needs {peak(asr, 8) / GIB:.1f} GiB predicted")
    assert f"Settings that would fit: asr_batch_size 3 (the largest that fits) ({peak(asr, 3) / GIB:.1f} GiB)" in msg
    assert "ser_batch_size" not in msg  # SER batch 1 fits
    h = dict(hparams)
    free = int(max(peak(asr, 8), peak(ser, 8)) * (1 + MARGIN) + OVERHEAD) + 1
    _gpu(monkeypatch, (free + CONTEXT) / 1e9, "big GPU")
    with caplog.at_level(logging.INFO, logger="lobes.memory_plan"):
        line = resolve_task_batches(h, {"device": "cuda:0"}, brain, sets, predictors={"asr": asr, "ser": ser})
    assert line == (f"memory plan: one task batch per optimizer step (no accumulation) x 1 GPU: asr_batch_size 8 "
                    f"({peak(asr, 8) / GIB:.1f} GiB, 2.0 s), ser_batch_size 8 ({peak(ser, 8) / GIB:.1f} GiB, 1.5 s) "
                    f"predicted of {free / GIB:.1f} GiB free on big GPU ({(free + CONTEXT) / 1e9:.0f} GB; margin 15% "
                    "+ 1.0 GiB)")
    assert line in caplog.text and h["micro_batch_size"] is None
    h = dict(hparams)
    assert resolve_task_batches(h, {"device": "cpu"}, brain, sets) is None and h["micro_batch_size"] is None


def test_harmonifuse_task_batch_is_global_over_the_gpus(harmonifuse_meta, monkeypatch):
    """Under 2 processes each GPU runs half of ``<task>_batch_size`` (ceil): ASR batch 8 needs 4 per GPU; where 3
    per GPU fit but 4 do not it is refused naming batch 6 (3 per GPU), and batch 6 is planned at 3 per GPU."""
    from lobes.memory_plan import (MARGIN, OVERHEAD, BrainPredictor, MemoryPlanError, peak_bytes,
                                   resolve_task_batches)

    hparams, brain, sets = harmonifuse_meta
    monkeypatch.setenv("WORLD_SIZE", "2")
    preds = {t: BrainPredictor(hparams, brain, sets[t], world=2) for t in ("asr", "ser")}
    free = int(peak_bytes(preds["asr"](3), 1, 2) * (1 + MARGIN) + OVERHEAD) + 1  # 3 per GPU fit, 4 do not
    assert peak_bytes(preds["asr"](4), 1, 2) * (1 + MARGIN) + OVERHEAD > free
    _gpu(monkeypatch, (free + CONTEXT) / 1e9, "small GPU")
    with pytest.raises(MemoryPlanError, match=r"asr_batch_size 6 \(the largest that fits: 3 per GPU\)"):
        resolve_task_batches(dict(hparams, ser_batch_size=2), {"device": "cuda:0"}, brain, sets, predictors=preds)
    line = resolve_task_batches(dict(hparams, asr_batch_size=6, ser_batch_size=2), {"device": "cuda:0"}, brain, sets,
                                predictors=preds)
    assert "x 2 GPUs: asr_batch_size 6 (" in line


def test_cli_prints_a_task_batch_as_its_global_size_and_per_gpu_share(capsys):
    """tools.plan_memory --plans on HarmoniFuse: a task batch is global, so 2 GPUs each run half of it; the plan
    line says so (it printed 'micro-batch 8 x accum 1' for 2 x 32 GB, while predicting 4 per GPU)."""
    out = PM.main([HF_YAML, "--shape", TINY, "--lm_shape", TINY_LM, "--max_duration", "0.5", "--plans"])
    printed = capsys.readouterr().out
    for task in ("asr", "ser"):
        plans = {p["gpus"]: p["plan"] for p in out["plans"] if p["task"] == task}
        assert f"1 x 80 GB, {task}_batch_size: {task}_batch_size 8 (predicted {plans[1][2] / PM.GIB:.1f} GiB per GPU)" \
            in printed
        assert f"2 x 32 GB, {task}_batch_size: {task}_batch_size 8 = 4 per GPU (predicted {plans[2][2] / PM.GIB:.1f}" \
            in printed
    assert "x accum" not in printed


@pytest.mark.parametrize("bad", ["huge"])
def test_bad_shape_is_named(bad):
    with pytest.raises(ValueError, match="--shape 'huge'"):
        PM.wavlm_config(bad)


# ------------------------------------------------------------------------------------------ micro_batch_size: auto
CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]
CONTEXT = 512 * 2 ** 20  # the CUDA context's share, already used when mem_get_info is read


@pytest.fixture(scope="module")
def setup4(tmp_path_factory, load_recipe):
    """The default AdaLTM Setup 4 row at WavLM-Large shape on meta (as tests/test_device_meta.py builds it), its
    Brain class and a training set whose longest utterance is 11 s (the paper's cut)."""
    import meta_device as md
    import numpy as np
    import soundfile as sf

    import lobes.adaltm.merged_wavlm
    import lobes.adaltm.task_vector
    from lobes.dataio import ser_datasets
    from lobes.hparams_io import load_hparams
    from lobes.memory_plan import BrainPredictor

    tmp = tmp_path_factory.mktemp("plan_auto")
    manifest = {}
    for utt, seconds in (("short", 3.0), ("long", 11.0)):
        sf.write(tmp / f"{utt}.wav", np.zeros(int(seconds * 16000), dtype="float32"), 16000)
        manifest[utt] = {"wav": str(tmp / f"{utt}.wav"), "duration": seconds, "emo": "Anger",
                         "emo_soft": [1.0] + [0.0] * 7, "spk_id": "1", "gender": "F"}
    (tmp / "train.json").write_text(json.dumps(manifest))
    train = ser_datasets({"train": str(tmp / "train.json")}, CLASSES)["train"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lobes.adaltm.merged_wavlm, "load_wavlm", md.meta_wavlm)
        mp.setattr(lobes.adaltm.task_vector, "load_task_vector", md.meta_task_vector)
        hparams, _, _ = load_hparams(ROW, {"output_folder": str(tmp / "out"), "wavlm_source": "meta://wavlm-large",
                                           "skip_prep": True, "vectors_folder": str(tmp / "v"),
                                           "data_folder": str(tmp), "number_of_epochs": 1})
    hparams["loss"].set_counts([10] * 8)
    brain = load_recipe("recipes/MSP-Podcast/adaltm/train.py").AdaLTMBrain
    assert hparams["micro_batch_size"] == "auto" and hparams["grad_accumulation_factor"] == 1  # the default
    return hparams, brain, train, BrainPredictor(hparams, brain, train)


def _gpu(monkeypatch, gb, name):
    """A simulated CUDA device of ``gb`` x 1e9 bytes (run_opts name it; torch.cuda.is_available stays False, or
    the optimizers on meta would probe CUDA graph capture)."""
    from types import SimpleNamespace

    total = int(gb * 1e9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - CONTEXT, total))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name=name, total_memory=total))


@pytest.mark.parametrize("gb, name, micro, accum", [(24, "NVIDIA A10", 4, 8), (80, "NVIDIA A100-SXM4-80GB", 16, 2)])
def test_auto_micro_batch_fits_the_gpu(setup4, monkeypatch, caplog, gb, name, micro, accum):
    """Setup 4 (2 task vectors, materialized, fp32, batch 32 of up to 11 s) needs ~6.6 GiB at micro-batch 1 and
    ~2 GiB per more utterance: 4 x 8 fits a 24 GB card (22.4 GiB), 16 x 2 an 80 GB one; 32 x 1 (71 GiB) does not."""
    import logging

    from lobes import distributed as D
    from lobes.memory_plan import GIB, MARGIN, OVERHEAD, peak_bytes, resolve_micro_batch

    hparams, brain, train, predictor = setup4
    h = dict(hparams)
    _gpu(monkeypatch, gb, name)
    with caplog.at_level(logging.INFO, logger="lobes.memory_plan"):
        line = resolve_micro_batch(h, {"device": "cuda:0"}, brain, train, predictor=predictor)
    assert (h["micro_batch_size"], h["grad_accumulation_factor"]) == (micro, accum)
    assert D.check_batch(h, accum, world=1) == f"global batch 32 = micro {micro} x accum {accum} x 1 GPU"
    free = gb * 1e9 - CONTEXT
    peak = peak_bytes(predictor(micro), accum, 1)
    assert peak * (1 + MARGIN) + OVERHEAD <= free  # fits ...
    if micro < 32:  # ... and the next divisor does not
        assert peak_bytes(predictor(2 * micro), accum // 2, 1) * (1 + MARGIN) + OVERHEAD > free
    assert line == (f"memory plan: micro-batch {micro} x accum {accum} x 1 GPU = global 32; predicted "
                    f"{peak / GIB:.1f} GiB of {free / GIB:.1f} GiB free on {name} ({gb} GB; margin 15% + 1.0 GiB), "
                    "longest utterance 11.0 s")
    assert line in caplog.text


@pytest.mark.parametrize("gb, names", [(4, []), (8, ["gradient_checkpointing: True", "at most about"])])
def test_auto_refuses_when_nothing_fits(setup4, monkeypatch, gb, names):
    """Micro-batch 1 needs more than the GPU: stop before any step, naming what would fit (and what would not)."""
    from lobes.memory_plan import MemoryPlanError, resolve_micro_batch

    hparams, brain, train, predictor = setup4
    h = dict(hparams)
    _gpu(monkeypatch, gb, "small GPU")
    with pytest.raises(MemoryPlanError) as err:
        resolve_micro_batch(h, {"device": "cuda:0"}, brain, train, predictor=predictor)
    msg = str(err.value)
    assert msg.startswith("memory plan: micro-batch 1 of 11.0 s needs 6.6 GiB predicted, more than fits")
    fit, _, rest = msg.partition("Settings that would fit: ")[2].partition("Would not fit: ")
    assert "precision: bf16 (" in rest and "delta_dtype: !name:torch.bfloat16 (" in rest  # tried, too large
    assert all(n in fit for n in names) and (names or fit.startswith("none of those tried"))
    assert h["micro_batch_size"] == "auto"  # nothing was set


def test_auto_is_null_on_cpu(setup4):
    """On the CPU (the demo, the tests) auto is today's null: the whole global batch, no accumulation."""
    from lobes.memory_plan import resolve_micro_batch

    hparams, brain, train, _ = setup4
    h = dict(hparams)
    assert resolve_micro_batch(h, {"device": "cpu"}, brain, train) is None
    assert (h["micro_batch_size"], h["grad_accumulation_factor"]) == (None, 1)
