"""AdaLTM's AdamW weight decay per parameter group (λ / α / head), as declared in the YAML."""
from pathlib import Path

import pytest
import torch
from transformers import WavLMModel

from lobes.adaltm.task_vector import compute_task_vector, save_task_vector
from lobes.hparams_io import load_hparams
from tools.make_tiny_wavlm import make_tiny_wavlm

ROOT = Path(__file__).resolve().parents[1]
ROW = ROOT / "recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd")
    base = make_tiny_wavlm(root / "base", seed=0)
    base_state = WavLMModel.from_pretrained(base).state_dict()
    vectors = root / "vectors"
    for name, out, seed in (("ASR", "asr_in", 1), ("SER", "ser", 2)):
        ft = WavLMModel.from_pretrained(make_tiny_wavlm(root / f"ft_{out}", seed=seed)).state_dict()
        save_task_vector(compute_task_vector(base_state, ft, name), vectors / f"{out}.safetensors")
    return root, base, vectors


def _brain(load_recipe, tiny_setup, extra=None):
    root, base, vectors = tiny_setup
    train = load_recipe("recipes/MSP-Podcast/adaltm/train.py")
    overrides = {"data_folder": str(root / "unused"), "wavlm_source": str(base), "vectors_folder": str(vectors),
                 "exp_folder": str(root / "exp"), "head_hidden": 8, **(extra or {})}
    hparams, _, _ = load_hparams(ROW, overrides)
    brain = train.AdaLTMBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                              run_opts={"device": "cpu"}, checkpointer=hparams["checkpointer"])
    brain.init_optimizers()
    return brain, hparams


def _groups(brain):
    return {g["name"]: g for g in brain.optimizer.param_groups}


def test_yaml_defaults_give_lambda_and_alpha_no_decay_and_the_head_torch_default(load_recipe, tiny_setup):
    brain, h = _brain(load_recipe, tiny_setup)
    groups = _groups(brain)
    assert set(groups) == {"lambda", "alpha", "head"}
    assert (groups["lambda"]["weight_decay"], groups["alpha"]["weight_decay"], groups["head"]["weight_decay"]) \
        == (0.0, 0.0, 0.01)
    assert [p is h["wavlm"].lambdas.lam for p in groups["lambda"]["params"]] == [True]
    assert [p is h["weighted_sum"].weights for p in groups["alpha"]["params"]] == [True]
    head = {id(p) for p in h["ser_head"].parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head
    assert len(brain.optimizer.param_groups) == 3  # nothing trainable left out or given twice
    assert all(g["lr"] == 1e-4 for g in brain.optimizer.param_groups)


def test_overrides_reach_the_groups_and_decay_shrinks_lambda_by_lr_times_wd(load_recipe, tiny_setup):
    brain, h = _brain(load_recipe, tiny_setup, {"lambda_weight_decay": 0.5, "head_weight_decay": 0.0, "lr": 0.1})
    groups = _groups(brain)
    assert (groups["lambda"]["weight_decay"], groups["alpha"]["weight_decay"], groups["head"]["weight_decay"]) \
        == (0.5, 0.0, 0.0)
    lam = h["wavlm"].lambdas.lam
    head_w = next(h["ser_head"].parameters())
    before = head_w.detach().clone()
    for p in (p for g in brain.optimizer.param_groups for p in g["params"]):
        p.grad = torch.zeros_like(p)  # no gradient: only the decoupled decay moves a parameter
    brain.optimizer.step()
    assert torch.allclose(lam.detach(), torch.full_like(lam, 0.5 * (1 - 0.1 * 0.5)), atol=1e-7)  # 0.475
    assert torch.equal(head_w.detach(), before)  # head decay 0: untouched
