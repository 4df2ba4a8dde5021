"""Every recipe's Brain runs a training step at WavLM-Large shape on a non-CPU device without a device mix or a
host sync: a tensor created on the CPU inside the step, or a ``.item()`` / ``.tolist()`` / ``bool(tensor)`` in
model code, fails here as it would fail (or stall the GPU) on CUDA. No GPU is needed: the step runs on
PyTorch's ``meta`` device (tests/meta_device.py says why and how).

What runs: the recipe's real YAML (row files too) through ``lobes.hparams_io.load_hparams`` with overrides, the
recipe's own Brain class from its train.py, built with ``run_opts={"device": "meta"}`` (SpeechBrain moves every
module there), ``on_fit_start`` (optimizers, checkpoint recovery: none), ``modules.train()``,
``on_stage_start(TRAIN)``, SpeechBrain's own ``Brain.fit_batch`` (forward and loss under ``training_ctx``,
backward, ``optimizers_step``: clipping, AdamW step, zero_grad; ``on_fit_batch_end``), and a second
``compute_forward`` + ``compute_objectives`` on the updated parameters. Weights: WavLM-Large's configuration built
on meta in place of ``load_wavlm``; task vectors are meta ΔW of the base's shapes.

Every case runs in bf16 as CUDA runs it; one case per Brain and merge strategy (``FP32_CASES``) runs in fp32 as
well, since fp32 differs from bf16 only by the absent autocast (the bf16 run is the stricter one: same code path
plus the dtype rules; running all of them in fp32 too cost ~90 s of the suite). torch's autocast refuses the meta
device, so the
Brain's ``training_ctx`` becomes :class:`lobes.memory_tracking.EmulatedAutocast` with CUDA's op lists (ATen's
``autocast_mode``; e.g. ``addmv`` / ``mv`` in bf16, which CPU autocast leaves in fp32), and
:class:`lobes.memory_tracking.SameDtypeCheck` adds the operand-dtype check of the GEMM / convolution / attention
kernels that their meta kernels skip: a dtype mix that CUDA raises on ("expected m1 and m2 to have the same
dtype") raises here too, in forward and in backward (checkpointed segments are recomputed under the
emulation too: ``checkpoint_recomputes_emulated``).

Patched, because it reads a value on the host and cannot run on meta: the NaN guard ``check_loss_isfinite``
(``bool(isfinite(loss))``, one sync per step on CUDA, outside model code). fit_batch's ``loss.detach().cpu()``
(the running average) is the one allowed host read (``LOOP_SYNCS``). Everything else runs under
:class:`tests.meta_device.HostSyncRecorder`: model and recipe code must not read a device value in the step,
HarmoniFuse included (``HARMONIFUSE_KNOWN_SYNCS`` lists a recipe's known syncs by source line; it is empty).
"""
from pathlib import Path

import meta_device as md  # tests/ is on sys.path (pytest rootdir conftest)
import pytest
import speechbrain as sb
import torch

from lobes.memory_tracking import meta_safe_autocast

REPO = Path(__file__).resolve().parents[1]
MSP = REPO / "recipes" / "MSP-Podcast"
ADALTM_ROWS = MSP / "adaltm" / "hparams" / "rows"
N_CLASSES = 8

# (function, file, source fragment): HarmoniFuse's known per-step host reads; none is left since its prefixes are
# padded tensors, its loss has a host-known shape and its right-padded LM input needs no padding mask (before:
# int(smask[b].sum()) per utterance, fused[valid], isfinite(loss) / loss.item(), the labels' .tolist() and
# transformers' padding_mask.all()). A new one fails the test.
HARMONIFUSE_KNOWN_SYNCS = []
# SpeechBrain's training loop: fit_batch returns the loss on the host for the running average (once per step)
LOOP_SYNCS = [("fit_batch", "core.py", "loss.detach().cpu()")]


# ------------------------------------------------------------------------------------------------ batches
def _wavs():
    n = int(md.SECONDS * md.SAMPLE_RATE)
    return [torch.randn(n), torch.randn(int(0.8 * n))]  # 11 s and 8.8 s: padding in the batch


def _batch(kind, task=None):
    from lobes import ctc_text

    words = ["THE QUICK BROWN FOX", "JUMPS OVER"]
    items = []
    for i, wav in enumerate(_wavs()):
        item = {"id": f"utt{i}", "sig": wav}
        if kind in ("asr", "mtl", "hf_asr"):
            item["wrd"] = words[i]
            item["tokens"] = ctc_text.encode(words[i])
        if kind in ("ser", "mtl", "hf_ser"):
            soft = torch.zeros(N_CLASSES)
            soft[i + 1] = 1.0
            item.update(emo_idx=torch.tensor([i + 1]), soft_label=soft, spk_id=f"spk{i}")
        if task:
            item["task"] = task
        items.append(item)
    return sb.dataio.batch.PaddedBatch(items)


# ------------------------------------------------------------------------------------------------ cases
CASES = []


def case(name, train_py, hparams, brain, kind, overrides=None, **kw):
    CASES.append(pytest.param(dict(train_py=train_py, hparams=hparams, brain=brain, kind=kind,
                                   overrides=overrides or {}, **kw), id=name))


for gc in (False, True):
    tag = "gc" if gc else "nogc"
    case(f"asr_msp-{tag}", MSP / "asr_ctc/train.py", MSP / "asr_ctc/hparams/train_asr_ctc.yaml", "ASRBrain", "asr",
         {"gradient_checkpointing": gc})
    case(f"ser-{tag}", MSP / "ser/train.py", MSP / "ser/hparams/train_ser.yaml", "SERBrain", "ser",
         {"gradient_checkpointing": gc})
    case(f"mtl_fully_trainable-{tag}", MSP / "mtl/train.py", MSP / "mtl/hparams/rows/fully_trainable.yaml",
         "MTLBrain", "mtl", {"gradient_checkpointing": gc})
case("asr_librispeech", REPO / "recipes/LibriSpeech/asr_ctc/train.py",
     REPO / "recipes/LibriSpeech/asr_ctc/hparams/train_asr_ctc.yaml", "ASRBrain", "asr")
case("mtl_static_init", MSP / "mtl/train.py", MSP / "mtl/hparams/rows/static_init.yaml", "MTLBrain", "mtl",
     static_init=True)

ADALTM = (MSP / "adaltm/train.py", "AdaLTMBrain", "ser")
for row in sorted(p.stem for p in ADALTM_ROWS.glob("*.yaml")):  # every row file, materialized (the default)
    case(f"adaltm_{row}", ADALTM[0], ADALTM_ROWS / f"{row}.yaml", *ADALTM[1:])
for row in ("setup2_asr_only", "setup4_dual"):                  # single- and dual-vector stacked layouts
    for impl in ("fused", "functional"):
        case(f"adaltm_{row}-{impl}", ADALTM[0], ADALTM_ROWS / f"{row}.yaml", *ADALTM[1:], {"merge_impl": impl})
for impl in ("materialized", "fused", "functional"):
    for gc in (True, "cnn"):
        case(f"adaltm_setup3_ser_only-{impl}-gc_{gc}", ADALTM[0], ADALTM_ROWS / "setup3_ser_only.yaml",
             *ADALTM[1:], {"merge_impl": impl, "gradient_checkpointing": gc})
case("adaltm_static_global-fused", ADALTM[0], ADALTM_ROWS / "static_global.yaml", *ADALTM[1:],
     {"merge_impl": "fused"})
# lowrank (issue 24; the row setup4_dual_lowrank is among the row files above): one vector, and checkpointing
LOWRANK = {"merge_impl": "lowrank", "delta_rank": 32}
case("adaltm_setup2_asr_only-lowrank", ADALTM[0], ADALTM_ROWS / "setup2_asr_only.yaml", *ADALTM[1:], LOWRANK)
for gc in (True, "cnn"):
    case(f"adaltm_setup3_ser_only-lowrank-gc_{gc}", ADALTM[0], ADALTM_ROWS / "setup3_ser_only.yaml", *ADALTM[1:],
         {**LOWRANK, "gradient_checkpointing": gc})

HF = MSP / "harmonifuse"
# every row file (LM modes, prompts, gates, LM fusion, fixed layers, single-task, IEMOCAP): ~3 s CPU each
HF_ROWS = sorted(p.stem for p in (HF / "hparams/rows").glob("*.yaml"))
for row in HF_ROWS:
    case(f"harmonifuse_{row}", HF / "train.py", HF / "hparams/rows" / f"{row}.yaml", "HarmoniFuseBrain", "hf")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tools.make_tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("meta_lm") / "lm")


@pytest.fixture
def meta_loaders(monkeypatch):
    """Large WavLM on meta instead of a download; meta task vectors; Meta CTC kernels."""
    import lobes.adaltm.low_rank
    import lobes.adaltm.merged_linear
    import lobes.adaltm.merged_wavlm
    import lobes.adaltm.task_vector
    import lobes.wavlm_encoder

    md.register_meta_ctc()
    monkeypatch.setattr(lobes.wavlm_encoder, "load_wavlm", md.meta_wavlm)
    monkeypatch.setattr(lobes.adaltm.merged_wavlm, "load_wavlm", md.meta_wavlm)
    monkeypatch.setattr(lobes.adaltm.task_vector, "load_task_vector", md.meta_task_vector)
    monkeypatch.setattr(lobes.adaltm.low_rank, "cached_factored", _meta_factored)
    merges = []
    real_merge_into = lobes.adaltm.merged_linear.merge_into
    monkeypatch.setattr(lobes.adaltm.merged_linear, "merge_into", lambda *a, **k: (merges.append(1),
                                                                                   real_merge_into(*a, **k)))
    return merges


def _meta_factored(path, spec):
    """delta_rank on meta: rank-``spec`` factors of the meta task vector's matrices (an SVD needs values)."""
    from lobes.adaltm.low_rank import FactoredVector, is_matrix

    tv = md.meta_task_vector(path)
    factors = {k: (torch.empty(t.shape[0], spec, device="meta"), torch.empty(t[0].numel(), spec, device="meta"))
               for k, t in tv.delta.items() if is_matrix(t)}
    return FactoredVector(Path(path).stem, {k: t for k, t in tv.delta.items() if k not in factors}, factors,
                          {k: tuple(tv.delta[k].shape) for k in factors})


def _build(c, tmp_path, load_recipe, tiny_lm):
    from lobes.hparams_io import _yaml, load_hparams, resolve_row

    module = load_recipe(str(c["train_py"].relative_to(REPO)))
    overrides = {"output_folder": str(tmp_path / "out"), "wavlm_source": "meta://wavlm-large", "skip_prep": True,
                 "vectors_folder": str(tmp_path / "vectors"), "precision": "fp32", "number_of_epochs": 1,
                 # bf16 runs under EmulatedAutocast (set on the built Brain): torch.autocast refuses "meta"
                 # HF's SpecAugment draws its spans on the host from the lengths (a sync; torch.nonzero has no
                 # meta kernel) and LayerDrop leaves skipped layers without a gradient: both off on meta
                 "apply_spec_augment": False, "layerdrop": 0.0}
    if c["kind"] == "hf":
        overrides.update(msp_folder=str(tmp_path), libri_folder=str(tmp_path), lm_source=str(tiny_lm))
    else:
        overrides["data_folder"] = str(tmp_path)
    keys = set(_yaml().load(resolve_row(c["hparams"])))
    overrides = {k: v for k, v in overrides.items() if k in keys}  # a recipe without vectors has no vectors_folder
    overrides.update(c["overrides"])
    hparams, _, _ = load_hparams(c["hparams"], overrides)
    if c.get("static_init"):  # train.py's main: W <- W + λ Σ ΔW before the Brain exists
        module.apply_static_merge(hparams["wavlm"].model, hparams["init_task_vectors"], hparams["init_lambda"])
    if "loss" in hparams and hasattr(hparams["loss"], "set_counts"):
        hparams["loss"].set_counts([10 * (i + 1) for i in range(N_CLASSES)])
    brain = getattr(module, c["brain"])(modules=hparams["modules"], opt_class=hparams["opt_class"],
                                        hparams=hparams, run_opts={"device": "meta"},
                                        checkpointer=hparams["checkpointer"])
    return brain, hparams


def _train_step(brain, batch, monkeypatch):
    """SpeechBrain's ``Brain.fit_batch``, the NaN guard patched (see the module docstring); the gradients are
    recorded as ``optimizers_step`` sees them (it ends with zero_grad)."""
    grads = {}
    real_step = brain.optimizers_step

    def optimizers_step():
        grads.update({id(p): p.grad for opt in brain.optimizers_dict.values() for g in opt.param_groups
                      for p in g["params"]})
        real_step()
    monkeypatch.setattr(brain, "check_loss_isfinite", lambda loss: None)
    monkeypatch.setattr(brain, "optimizers_step", optimizers_step)
    brain.step += 1  # as Brain._fit_train does before fit_batch
    brain.fit_batch(batch)
    return grads


# fp32 as well for one case per Brain / merge strategy / LM mode
FP32_CASES = {"asr_msp-gc", "ser-nogc", "mtl_fully_trainable-gc", "mtl_static_init", "adaltm_setup4_dual",
              "adaltm_setup4_dual-fused", "adaltm_setup4_dual-functional", "adaltm_setup3_ser_only-lowrank-gc_True",
              "harmonifuse_full", "harmonifuse_gpu_llm_lora", "harmonifuse_lm_frozen"}
STEP_CASES = [pytest.param(c.values[0], precision, id=f"{c.id}-{precision}")
              for c in CASES for precision in ("fp32", "bf16") if precision == "bf16" or c.id in FP32_CASES]


@pytest.mark.parametrize(("c", "precision"), STEP_CASES)
def test_training_step_on_meta_device(c, precision, tmp_path, load_recipe, meta_loaders, tiny_lm, monkeypatch):
    hf = c["kind"] == "hf"
    if hf:  # HF's rotary embedding opens a disabled autocast on "meta" (lobes.memory_tracking says why)
        monkeypatch.setattr(torch, "autocast", meta_safe_autocast(torch.autocast))
    brain, hparams = _build(c, tmp_path, load_recipe, tiny_lm)
    if hf:
        tasks = list(hparams["train_tasks"])
        batches = [_batch(f"hf_{t}", t) for t in (tasks * 2)[:2]]  # both tasks when both train
    else:
        batches = [_batch(c["kind"]), _batch(c["kind"])]
    if precision == "bf16":  # the YAML's precision: bf16 as CUDA's autocast runs it
        brain.training_ctx = md.EmulatedAutocast("cuda", torch.bfloat16)
    recorder = md.HostSyncRecorder()
    brain.on_fit_start()
    brain.modules.train()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    wavlm = hparams["wavlm"]
    materialized = getattr(wavlm, "merge_impl", None) == "materialized" and wavlm.num_vectors
    with recorder, md.SameDtypeCheck(), md.checkpoint_recomputes_emulated():
        grads = _train_step(brain, batches[0], monkeypatch)
        merges_first = len(meta_loaders)
        with brain.training_ctx:
            out2 = brain.compute_forward(batches[1], sb.Stage.TRAIN)
            loss2 = brain.compute_objectives(out2, batches[1], sb.Stage.TRAIN)
    merges_second = len(meta_loaders) - merges_first

    # no host read of a device value in the step (HarmoniFuse: only its known ones)
    allowed = LOOP_SYNCS + (HARMONIFUSE_KNOWN_SYNCS if hf else [])
    unexpected = [(fn, f, src) for fn, f, _, src in recorder.syncs
                  if not any(fn == kfn and f == kf and frag in src for kfn, kf, frag in allowed)]
    assert not unexpected, f"host syncs in the training step:\n{recorder.report()}"

    # the step ran on meta, with a gradient for every trainable parameter (HarmoniFuse: some are per task)
    assert loss2.device.type == "meta" and loss2.dim() == 0
    trainable = [p for opt in brain.optimizers_dict.values() for g in opt.param_groups for p in g["params"]]
    assert trainable and all(p.requires_grad for p in trainable)
    with_grad = [p for p in trainable if grads[id(p)] is not None]
    if hf:
        assert with_grad
    else:
        names = {id(p): n for n, p in brain.modules.named_parameters()}
        missing = [names.get(id(p), "?") for p in trainable if grads[id(p)] is None]
        assert not missing, f"trainable parameters without a gradient (DDP stops on these): {missing}"
    assert all(grads[id(p)].device.type == "meta" and grads[id(p)].shape == p.shape for p in with_grad)
    for opt in brain.optimizers_dict.values():
        states = [opt.state[p] for p in with_grad if p in opt.state]
        assert all(t.device.type == "meta" for s in states for t in md.tensors_of(s) if t.dim() > 0)
    n_opt_states = sum(len(opt.state) for opt in brain.optimizers_dict.values())
    assert n_opt_states == len(with_grad)  # AdamW stepped every parameter that had a gradient
    for name, t in list(brain.modules.named_parameters()) + list(brain.modules.named_buffers()):
        assert t.device.type == "meta", f"{name} is on {t.device}"

    # outputs at WavLM-Large shape: 549 frames for 11 s
    if c["kind"] in ("ser",):
        assert out2.shape == (2, N_CLASSES)
    elif c["kind"] == "asr":
        from lobes import ctc_text

        assert out2[0].shape == (2, md.FRAMES, len(ctc_text.VOCAB)) and out2[1].shape == (2, md.FRAMES)
    elif c["kind"] == "mtl":
        assert out2[0].shape == (2, N_CLASSES) and out2[1].shape[:2] == (2, md.FRAMES)

    if c["kind"] == "ser" and c["brain"] == "AdaLTMBrain" and wavlm.num_vectors:
        lam = wavlm.lambdas.lam
        k = wavlm.num_vectors
        assert lam.device.type == "meta"
        assert lam.shape == {"layerwise": (k, 25), "global": (k, 1), "fixed": (k, 1)}[wavlm.lambdas.mode]
        if lam.requires_grad:
            assert grads[id(lam)] is not None
        if materialized:
            # the first forward merges every weight; after the optimizer step a trainable λ is merged again,
            # a fixed λ not
            assert merges_first == len(wavlm.keys)
            assert merges_second == (len(wavlm.keys) if lam.requires_grad else 0)
        else:
            assert merges_first == merges_second == 0


# ------------------------------------------------------------------------------------------------ host-side re-merge
@pytest.mark.parametrize("optimizer", ["foreach", "fused"])
def test_materialized_merge_follows_lambda_without_reading_it(tmp_path, optimizer):
    """materialized decides on the host when to re-merge (no GPU read of λ). Whatever optimizer implementation
    updates λ (foreach or fused AdamW, which writes λ in place without bumping its version counter), after a
    training step a no-grad forward (validation) must run on W_base + λ ΔW for the *updated* λ, bitwise as a
    fresh model with that λ."""
    from transformers import WavLMModel

    from lobes.adaltm.merged_wavlm import MergedWavLM
    from tools.make_tiny_wavlm import make_tiny_wavlm

    base = make_tiny_wavlm(tmp_path / "base", seed=0)
    g = torch.Generator().manual_seed(3)
    vec = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in WavLMModel.from_pretrained(base).state_dict().items()}
    wavs, lens = torch.randn(2, 4000, generator=g), torch.tensor([1.0, 0.6])
    m = MergedWavLM(base, {"SER": vec}, merge_impl="materialized")
    opt = torch.optim.AdamW([m.lambdas.lam], lr=0.1, **{optimizer: True})
    h, mask = m(wavs, lens)
    (h * mask[None, ..., None]).pow(2).mean().backward()
    before = m.lambdas.lam.detach().clone()
    opt.step()
    assert not torch.equal(m.lambdas.lam.detach(), before)  # λ moved: the validation forward must see it
    # AdamW's first step: decay 0.5 -> 0.4995, then every λ moves by lr = 0.1 against its gradient's sign
    step = (m.lambdas.lam.detach() - 0.4995).abs()
    assert torch.allclose(step, torch.full_like(step, 0.1), atol=1e-4)
    with torch.no_grad():
        got, _ = m(wavs, lens)
        fresh = MergedWavLM(base, {"SER": vec}, merge_impl="materialized")
        fresh.lambdas.lam.copy_(m.lambdas.lam)
        want, _ = fresh(wavs, lens)
    assert torch.equal(got, want)
    key = "encoder.layers.1.feed_forward.intermediate_dense.weight"
    lam = m.lambdas.lam[0, m.group_of[key]]
    want_w = m.base_weights[key.replace(".", "__")] + lam.detach() * vec[key]  # eq. (4) for the updated λ
    assert torch.allclose(m.base_parameter(key), want_w, rtol=0, atol=1e-7)
