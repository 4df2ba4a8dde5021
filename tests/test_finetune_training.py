"""Fine-tuning recipes train like the anchors' (issue 16): learning-rate schedules, SpecAugment-style masking and
LayerDrop, TensorBoard curves.

The schedule tests run ``ToolkitBrain.fit`` on a two-module toy model (a "backbone" and a "head" Linear, the two
optimizers of every recipe) so every optimizer step is cheap; the masking tests use the tiny WavLM.
"""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import speechbrain as sb
import torch
from speechbrain.nnet.schedulers import LinearWarmupScheduler, NewBobScheduler

from lobes.brains import ToolkitBrain
from lobes.checkpointing import AtomicCheckpointer
from lobes.errors import DataError

N_BATCHES = 7          # micro-batches per epoch
ACCUM = 2              # micro-batches per optimizer step -> 3 optimizer steps per epoch (SpeechBrain: every 2nd)
EPOCHS = 4
LR, LR_BACKBONE = 0.1, 0.01


class _Stop(Exception):
    pass


class ToyBrain(ToolkitBrain):
    """Records the learning rate each optimizer step used; can stop (as a crash would) at a chosen step."""

    def compute_forward(self, batch, stage):
        x, _ = batch
        return self.modules.head(torch.tanh(self.modules.backbone(x))).squeeze(-1)

    def compute_objectives(self, pred, batch, stage):
        return torch.nn.functional.mse_loss(pred, batch[1])

    def on_stage_end(self, stage, stage_loss, epoch=None):  # log, anneal, checkpoint: as every recipe does
        self.log_and_checkpoint(stage, stage_loss, epoch, {})

    def optimizers_step(self):
        if len(self.used_lrs) == self.stop_at:
            raise _Stop
        self.used_lrs.append({n: o.param_groups[0]["lr"] for n, o in self.optimizers_dict.items()})
        super().optimizers_step()


class ListLogger:
    """A train logger that keeps what it is given (to compare with what TensorBoard stored)."""

    def __init__(self):
        self.calls = []

    def log_stats(self, stats_meta, train_stats=None, valid_stats=None, test_stats=None, verbose=False):
        self.calls.append({"meta": dict(stats_meta), "train": dict(train_stats or {}),
                           "valid": dict(valid_stats or {})})


def _loader(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * 4, 3, generator=g)
    y = x.sum(-1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)


def _brain(out, schedulers="linear", stop_at=None, epochs=EPOCHS, tensorboard=False):
    torch.manual_seed(0)
    backbone, head = torch.nn.Linear(3, 8), torch.nn.Linear(8, 1)
    counter = sb.utils.epoch_loop.EpochCounter(epochs)
    if schedulers == "linear":
        scheds = {"opt_class": LinearWarmupScheduler(LR, None, None),
                  "backbone_opt_class": LinearWarmupScheduler(LR_BACKBONE, None, None)}
    elif schedulers == "newbob":
        scheds = {"opt_class": NewBobScheduler(LR, annealing_factor=0.5, improvement_threshold=0.5),
                  "backbone_opt_class": NewBobScheduler(LR_BACKBONE, annealing_factor=0.8, improvement_threshold=0.5)}
    else:
        scheds = {}
    ckpt = AtomicCheckpointer(out / "save", recoverables={
        "backbone": backbone, "head": head, "counter": counter,
        **{f"lr_annealing_{n}": s for n, s in scheds.items()}})
    hparams = {
        "output_folder": str(out), "train_log": str(out / "train_log.txt"), "epoch_counter": counter,
        "backbone_modules": ["backbone"], "backbone_opt_class": lambda p: torch.optim.SGD(p, lr=LR_BACKBONE),
        "lr_schedulers": scheds, "warmup_ratio": 0.25, "ckpts_to_keep": 1, "max_grad_norm": 5.0,
        "grad_accumulation_factor": ACCUM, "train_logger": ListLogger(), "use_tensorboard": tensorboard,
        "tensorboard_logger": lambda: sb.utils.train_logger.TensorboardLogger(str(out / "tensorboard")),
        "use_wandb": False, "curves_plot": None,
    }
    brain = ToyBrain(modules={"backbone": backbone, "head": head}, opt_class=lambda p: torch.optim.SGD(p, lr=LR),
                     hparams=hparams, checkpointer=ckpt, run_opts={"device": "cpu", "noprogressbar": True})
    brain.used_lrs, brain.stop_at = [], stop_at
    return brain


def _fit(brain):
    brain.fit(brain.hparams.epoch_counter, _loader(1, N_BATCHES), _loader(2, 2))
    return brain


def _linear(lr0, k, warmup, total):
    """HF's linear schedule with warm-up: the learning rate of optimizer step k (0-based)."""
    return lr0 * k / warmup if k < warmup else lr0 * max(0.0, (total - k) / (total - warmup))


def test_linear_warmup_lr_of_every_optimizer_step_is_the_formula(tmp_path):
    brain = _fit(_brain(tmp_path))
    steps_per_epoch = N_BATCHES // ACCUM          # 3: the schedule counts optimizer steps, not micro-batches
    total = EPOCHS * steps_per_epoch              # 12
    warmup = math.ceil(0.25 * total)              # 3
    sched = brain.hparams.lr_schedulers["opt_class"]
    assert (sched.num_training_steps, sched.num_warmup_steps, sched.current_step) == (12, 3, 12)
    assert len(brain.used_lrs) == total
    for k, used in enumerate(brain.used_lrs):
        assert used["opt_class"] == pytest.approx(_linear(LR, k, warmup, total), abs=1e-12), k
        assert used["backbone_opt_class"] == pytest.approx(_linear(LR_BACKBONE, k, warmup, total), abs=1e-12), k
    # chosen steps by hand: 0 (warm-up starts at 0, as HF), 2 (2/3 up), 3 (peak), 9 (3/9 of the decay left)
    assert [u["opt_class"] for u in brain.used_lrs[:4]] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert brain.used_lrs[9]["opt_class"] == pytest.approx(0.1 * 3 / 9)
    # the per-epoch log carries the learning rate after each epoch's last step
    lrs = [c["meta"]["lr"] for c in brain.hparams.train_logger.calls if "epoch" in c["meta"]]
    assert lrs == pytest.approx([_linear(LR, 3 * e, warmup, total) for e in range(1, EPOCHS + 1)])


def test_resumed_run_continues_the_schedule_where_it_stopped(tmp_path):
    full = _fit(_brain(tmp_path / "full"))
    # crash at the first optimizer step of epoch 3 (after the epoch-2 checkpoint), then a fresh process resumes
    with pytest.raises(_Stop):
        _fit(_brain(tmp_path / "resumed", stop_at=7))
    resumed = _fit(_brain(tmp_path / "resumed"))
    assert resumed.hparams.lr_schedulers["opt_class"].current_step == 12
    # the resumed process ran epochs 3 and 4 = optimizer steps 6..11, at the uninterrupted run's rates
    assert len(resumed.used_lrs) == 6
    assert resumed.used_lrs == full.used_lrs[6:]
    assert resumed.used_lrs[0]["opt_class"] == pytest.approx(0.1 * 6 / 9)  # not the warm-up's 0 of a restart


def test_newbob_anneals_each_optimizer_after_a_validation_without_enough_improvement(tmp_path):
    brain = _fit(_brain(tmp_path, schedulers="newbob", epochs=3))
    head, backbone = (brain.hparams.lr_schedulers[n] for n in ("opt_class", "backbone_opt_class"))
    losses = head.metric_values
    assert len(losses) == 3 and backbone.metric_values == losses
    # threshold 0.5: each validation after the first that did not halve the loss multiplies the rate
    n_anneal = sum((a - b) / a < 0.5 for a, b in itertools.pairwise(losses))
    assert n_anneal >= 1
    assert head.hyperparam_value == pytest.approx(LR * 0.5 ** n_anneal)
    assert brain.optimizers_dict["opt_class"].param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** n_anneal)
    assert brain.optimizers_dict["backbone_opt_class"].param_groups[0]["lr"] == pytest.approx(
        LR_BACKBONE * 0.8 ** n_anneal)
    # within an epoch the rate is constant: every step of epoch 1 used the initial rates
    assert {u["opt_class"] for u in brain.used_lrs[:3]} == {LR}


def test_a_scheduler_outside_the_checkpointer_is_an_error(tmp_path):
    brain = _brain(tmp_path)
    brain.hparams.lr_schedulers["opt_class"] = LinearWarmupScheduler(LR, None, None)  # not a recoverable
    with pytest.raises(DataError, match="lr_schedulers.opt_class is not in the checkpointer"):
        _fit(brain)


def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    brain = _fit(_brain(tmp_path, epochs=3, tensorboard=True))
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    logged = [c for c in brain.hparams.train_logger.calls if "epoch" in c["meta"]]
    assert {"loss/train", "loss/valid", "lr", "lr_backbone", "epoch"} <= set(acc.Tags()["scalars"])
    for tag, values in [("loss/train", [c["train"]["loss"] for c in logged]),
                        ("loss/valid", [c["valid"]["loss"] for c in logged]),
                        ("lr", [c["meta"]["lr"] for c in logged])]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]               # x = epoch
        assert [e.value for e in events] == pytest.approx(values, rel=1e-6)  # float32 in the event file


def test_curves_plot_reads_the_train_log_and_keeps_a_resumed_epochs_last_line(tmp_path):
    from PIL import Image

    from lobes.plots import _read_train_log, plot_training_curves

    log = tmp_path / "train_log.txt"
    log.write_text("epoch: 1, lr: 1.00e-03, lr_backbone: 1.00e-04 - train loss: 3.0, train time_s: 1.0 - valid loss: "
                   "2.5, valid WER: 90.0, valid time_s: 0.5\n"
                   "epoch: 2, lr: 5.00e-04, lr_backbone: 5.00e-05 - train loss: 2.0 - valid loss: 2.2, valid WER: 80.0\n"
                   "epoch: 2, lr: 5.00e-04, lr_backbone: 5.00e-05 - train loss: 1.9 - valid loss: 2.1, valid WER: 70.0\n"
                   "Epoch loaded: 2 - test loss: 2.0, test WER: 0.7\n")
    epochs = _read_train_log(log)
    assert list(epochs) == [1, 2]
    assert epochs[2] == {"lr": 5e-4, "lr_backbone": 5e-5, "train loss": 1.9, "valid loss": 2.1, "valid WER": 70.0}
    png = plot_training_curves(log, tmp_path / "curves.png")
    assert Image.open(png).size == (1200, 400)
    (tmp_path / "empty.txt").write_text("Epoch loaded: 1 - test loss: 1\n")
    with pytest.raises(DataError, match="empty.txt: no epoch lines"):
        plot_training_curves(tmp_path / "empty.txt", tmp_path / "x.png")


# ------------------------------------------------------------------------------ masking and LayerDrop (tiny WavLM)
@pytest.fixture(scope="module")
def tiny_wavlm(tmp_path_factory):
    from tools.make_tiny_wavlm import make_tiny_wavlm

    return make_tiny_wavlm(tmp_path_factory.mktemp("ft_wavlm") / "tiny_wavlm")


MASKING = {"apply_spec_augment": True, "mask_time_prob": 0.3, "mask_time_length": 3, "mask_feature_prob": 0.3,
           "mask_feature_length": 2}


def _encoder_input(enc, wavs, lens):
    """The features entering the transformer (after HF's masking), captured by a hook."""
    seen = []
    hook = enc.model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        enc(wavs, lens)
    finally:
        hook.remove()
    return seen[0]


def _masked(enc, feats):
    """(frames replaced by masked_spec_embed, channels zero at every frame) per utterance."""
    emb = enc.model.masked_spec_embed.detach()
    channels = (feats == 0).all(1)                                      # [B, D]
    same = (feats == emb) | channels[:, None, :]                        # a zeroed channel says nothing
    frames = same.all(-1)                                               # [B, T]
    return frames, channels


def test_masking_follows_hf_in_train_mode_only_and_never_for_a_frozen_backbone(tiny_wavlm):
    from transformers.models.wavlm.modeling_wavlm import _compute_mask_indices

    from lobes.wavlm_encoder import WavLMEncoder

    torch.manual_seed(0)
    wavs, lens = torch.randn(2, 16000), torch.ones(2)
    enc = WavLMEncoder(str(tiny_wavlm), **MASKING)
    assert enc.training_only_keys == ["masked_spec_embed"]  # the tiny checkpoint has none: left out of exports
    assert "masked_spec_embed" not in enc.export_state()
    emb = enc.model.masked_spec_embed  # initialised (from_pretrained left it as raw memory: NaN losses)
    assert emb.shape == (enc.hidden_size,) and bool(((emb >= 0) & (emb < 1)).all())
    assert emb.requires_grad  # trained with the backbone; without time masking it would get no gradient (DDP):
    channel_only = WavLMEncoder(str(tiny_wavlm), **{**MASKING, "mask_time_prob": 0.0})
    assert not channel_only.model.masked_spec_embed.requires_grad
    # masking off: the model has exactly the checkpoint's parameters (task vectors / static merges fit it)
    off = WavLMEncoder(str(tiny_wavlm), **{**MASKING, "apply_spec_augment": False})
    assert off.training_only_keys == [] and not hasattr(off.model, "masked_spec_embed")
    enc.train()
    np.random.seed(7)
    frames, channels = _masked(enc, _encoder_input(enc, wavs, lens))
    # the same draws HF makes (numpy's global RNG: time spans first, then channel spans)
    n_frames, hidden = frames.shape[1], enc.hidden_size
    np.random.seed(7)
    want_t = _compute_mask_indices((2, n_frames), 0.3, 3, attention_mask=torch.ones(2, n_frames, dtype=torch.long),
                                   min_masks=2)
    want_c = _compute_mask_indices((2, hidden), 0.3, 2, min_masks=0)
    assert frames.tolist() == want_t.tolist() and frames.sum() >= 2 * 3  # at least min_masks spans of 3 frames
    assert channels.tolist() == want_c.tolist() and channels.sum() > 0

    enc.eval()
    frames, channels = _masked(enc, _encoder_input(enc, wavs, lens))
    assert frames.sum() == 0 and channels.sum() == 0
    plain = WavLMEncoder(str(tiny_wavlm)).eval()
    with torch.no_grad():
        assert torch.equal(enc(wavs, lens)[0], plain(wavs, lens)[0])  # eval: the same network as without masking

    frozen = WavLMEncoder(str(tiny_wavlm), freeze=True, layerdrop=0.5, **MASKING).train()
    np.random.seed(7)
    frames, channels = _masked(frozen, _encoder_input(frozen, wavs, lens))
    assert frames.sum() == 0 and channels.sum() == 0
    with torch.no_grad():
        assert torch.equal(frozen(wavs, lens)[0], plain(wavs, lens)[0])


def test_layerdrop_skips_layers_in_train_mode_only(tiny_wavlm):
    from lobes.wavlm_encoder import WavLMEncoder

    wavs, lens = torch.randn(1, 8000, generator=torch.Generator().manual_seed(1)), torch.ones(1)
    enc = WavLMEncoder(str(tiny_wavlm), layerdrop=0.9)
    enc.model.config.hidden_dropout = enc.model.config.attention_dropout = 0.0

    def skipped(hidden):  # a skipped layer hands its input on unchanged
        return sum(torch.equal(hidden[i], hidden[i + 1]) for i in range(1, enc.num_layers - 1))

    enc.train()
    torch.manual_seed(3)
    assert skipped(enc(wavs, lens)[0].detach()) > 0
    enc.eval()
    with torch.no_grad():
        assert skipped(enc(wavs, lens)[0]) == 0
    with pytest.raises(DataError, match="layerdrop: 1.0 must be in"):
        WavLMEncoder(str(tiny_wavlm), layerdrop=1.0)


@pytest.mark.parametrize("yaml, on", [("recipes/MSP-Podcast/asr_ctc/hparams/train_asr_ctc.yaml", True),
                                      ("recipes/LibriSpeech/asr_ctc/hparams/train_asr_ctc.yaml", True),
                                      ("recipes/MSP-Podcast/ser/hparams/train_ser.yaml", False),
                                      ("recipes/MSP-Podcast/mtl/hparams/mtl.yaml", False),
                                      ("recipes/IEMOCAP/asr_ctc/hparams/train_asr_ctc.yaml", True),
                                      ("recipes/IEMOCAP/ser/hparams/train_ser.yaml", False)])
def test_recipe_yamls_mask_and_drop_layers_only_where_allowed(yaml, on):
    """ASR: masking + LayerDrop; a weighted layer sum (SER, MTL): LayerDrop 0 (s3prl), masking off (measured)."""
    from lobes.hparams_io import _yaml

    h = _yaml().load(Path(__file__).resolve().parents[1].joinpath(yaml).read_text())
    assert h["apply_spec_augment"] is on and h["mask_time_prob"] == 0.05 and h["mask_time_length"] == 10
    assert h["mask_time_min_masks"] == 2 and h["mask_feature_prob"] == 0.0
    keys = ("apply_spec_augment", "mask_time_prob", "mask_time_length", "mask_time_min_masks", "mask_feature_prob",
            "mask_feature_length", "layerdrop")
    assert all(k in h["wavlm"] for k in keys)  # every key reaches the encoder
    assert h["layerdrop"] == (0.05 if on else 0.0)
    assert set(h["lr_schedulers"]) == {"opt_class", "backbone_opt_class"}
    rec = h["checkpointer"]["recoverables"]
    assert {"lr_annealing", "lr_annealing_wavlm"} <= set(rec)
    assert h["use_tensorboard"] is True


def test_wandb_requested_without_wandb_installed_is_an_error_naming_the_key(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    brain = _brain(tmp_path)
    brain.hparams.use_wandb = True
    with pytest.raises(DataError, match="use_wandb: True, but wandb is not installed"):
        _fit(brain)
    assert brain.used_lrs == []  # before the first step


def test_a_null_schedule_keeps_that_optimizers_rate_constant(tmp_path):
    brain = _brain(tmp_path)
    brain.hparams.lr_schedulers["backbone_opt_class"] = None  # what --lr_schedulers="{backbone_opt_class: null}" gives
    _fit(brain)
    assert {u["backbone_opt_class"] for u in brain.used_lrs} == {LR_BACKBONE}
    assert brain.used_lrs[3]["opt_class"] == pytest.approx(LR)  # the head's schedule still runs (peak at step 3)
    assert brain.used_lrs[0]["opt_class"] == 0.0
