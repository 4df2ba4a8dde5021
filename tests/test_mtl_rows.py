"""Table 1 Part 1: the paper's fully-trainable MTL row (CNN trains, AdamW 1e-4, batch 32, 100 epochs) and the
CNN-frozen DLR variant row."""
from pathlib import Path

import pytest
import torch

from lobes.hparams_io import load_hparams
from tools.make_tiny_wavlm import make_tiny_wavlm

ROWS = Path(__file__).resolve().parents[1] / "recipes/MSP-Podcast/mtl/hparams/rows"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_wavlm(tmp_path_factory.mktemp("mtl") / "wavlm", seed=0)


def _brain(load_recipe, tiny, row, tmp_path):
    train = load_recipe("recipes/MSP-Podcast/mtl/train.py")
    h, _, _ = load_hparams(ROWS / f"{row}.yaml", {"data_folder": str(tmp_path), "wavlm_source": str(tiny),
                                                   "exp_folder": str(tmp_path / "exp"), "head_hidden": 8})
    brain = train.MTLBrain(modules=h["modules"], opt_class=h["opt_class"], hparams=h, run_opts={"device": "cpu"},
                           checkpointer=h["checkpointer"])
    brain.init_optimizers()
    return brain, h


def _cnn_grad_after_one_backward(h):
    wavlm = h["wavlm"]
    wavlm.train()
    g = torch.Generator().manual_seed(0)
    hidden, mask = wavlm(torch.randn(2, 8000, generator=g), torch.tensor([1.0, 0.7]))
    logits = h["ser_head"](h["weighted_sum"](hidden), mask)
    (logits.sum() + h["ctc_head"](hidden[-1]).sum()).backward()
    return wavlm.model.feature_extractor.conv_layers[0].conv.weight.grad


@pytest.mark.parametrize("row, epochs, batch, lr_wavlm, cnn_trains", [
    ("fully_trainable", 100, 32, 1e-4, True),       # the paper's row (§3.3)
    ("static_init", 100, 32, 1e-4, True),           # the paper's second Part-1 row: same training, merged init
    ("fully_trainable_dlr", 10, 8, 1e-5, False),    # variant: the earlier CNN-frozen DLR configuration
])
def test_part1_rows_settings_and_what_trains(load_recipe, tiny, tmp_path, row, epochs, batch, lr_wavlm, cnn_trains):
    if row == "static_init":  # needs task vectors on disk; its training settings are the base's
        h, _, _ = load_hparams(ROWS / f"{row}.yaml", {"data_folder": str(tmp_path), "wavlm_source": str(tiny),
                                                      "vectors_folder": str(tmp_path)})
        assert (h["number_of_epochs"], h["batch_size"], h["lr"], h["lr_wavlm"], h["freeze_cnn"]) \
            == (epochs, batch, 1e-4, lr_wavlm, not cnn_trains)
        return
    brain, h = _brain(load_recipe, tiny, row, tmp_path)
    assert (h["number_of_epochs"], h["batch_size"], h["epoch_counter"].limit) == (epochs, batch, epochs)
    cnn = list(h["wavlm"].model.feature_extractor.parameters())
    backbone = {id(p) for g in brain.backbone_optimizer.param_groups for p in g["params"]}
    assert all((id(p) in backbone) == cnn_trains for p in cnn)
    n_trainable = sum(p.numel() for p in h["wavlm"].parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in h["wavlm"].parameters())
    n_cnn = sum(p.numel() for p in cnn)
    assert n_trainable == (n_all if cnn_trains else n_all - n_cnn)
    for opt, lr in ((brain.optimizer, 1e-4), (brain.backbone_optimizer, lr_wavlm)):
        assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(lr, 0.01)]
    grad = _cnn_grad_after_one_backward(h)
    assert (grad is not None and float(grad.abs().sum()) > 0) == cnn_trains
