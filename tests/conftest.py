"""Shared pytest fixtures (session-scoped, built once per test run; names are stable, recipe tests reuse them).

- ``mini_corpora``: synthetic corpora from ``tools.make_mini_corpora`` (seed 1234, default sizes), with
  ``.msp`` / ``.libri`` (pathlib.Path roots) and ``.msp_counts`` / ``.libri_counts`` (their mini_counts.json).
- ``load_recipe``: ``load_recipe("recipes/MSP-Podcast/msp_podcast_prepare.py")`` imports a recipe script
  (recipe folders have hyphens, so they are not packages).
- ``msp_manifests`` / ``libri_manifests``: folders holding the manifests prepared from ``mini_corpora``
  (MSP: train/valid/test.json, all labelled utterances; LibriSpeech: train-clean-100/dev-clean/test-clean.json).
- ``harmonifuse_trained``: the folder of one HarmoniFuse recipe run (tests/harmonifuse_run.py).
"""
import importlib.util
import json
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MINI_SEED = 1234


def _load_recipe(relpath):
    path = (REPO_ROOT / relpath).resolve()
    name = "recipe_" + "_".join(path.relative_to(REPO_ROOT).with_suffix("").parts).replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test (exports and cards load without a hub)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def load_recipe():
    return _load_recipe


@pytest.fixture(scope="session")
def mini_corpora(tmp_path_factory):
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: cannot generate the mini corpora")
    from tools.make_mini_corpora import make_mini_corpora

    root = tmp_path_factory.mktemp("mini_corpora")
    msp, libri = root / "msp", root / "libri"
    make_mini_corpora(msp, libri, seed=MINI_SEED)
    return SimpleNamespace(
        msp=msp, libri=libri, seed=MINI_SEED,
        msp_counts=json.loads((msp / "mini_counts.json").read_text()),
        libri_counts=json.loads((libri / "mini_counts.json").read_text()),
    )


@pytest.fixture(scope="session")
def msp_manifests(mini_corpora, tmp_path_factory):
    prep = _load_recipe("recipes/MSP-Podcast/msp_podcast_prepare.py")
    out = tmp_path_factory.mktemp("msp_manifests")
    prep.prepare_msp_podcast(mini_corpora.msp, out)
    return out


@pytest.fixture(scope="session")
def libri_manifests(mini_corpora, tmp_path_factory):
    prep = _load_recipe("recipes/LibriSpeech/librispeech_prepare.py")
    out = tmp_path_factory.mktemp("libri_manifests")
    prep.prepare_librispeech(mini_corpora.libri, out)
    return out


# IEMOCAP (recipes/IEMOCAP): ``mini_iemocap`` = the synthetic IEMOCAP_full_release (``.root``) with its expected
# counts (``.counts``, mini_counts.json); ``iemocap_manifests`` = folder with classes.txt and fold{1..5}/*.json
# prepared from it with the default 4-class map.
@pytest.fixture(scope="session")
def mini_iemocap(tmp_path_factory):
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: cannot generate the mini IEMOCAP")
    gen = _load_recipe("recipes/IEMOCAP/make_mini_iemocap.py")
    root = tmp_path_factory.mktemp("mini_iemocap") / "IEMOCAP_full_release"
    counts = gen.make_mini_iemocap(root, seed=MINI_SEED)
    return SimpleNamespace(root=root, seed=MINI_SEED, counts=counts)


@pytest.fixture(scope="session")
def iemocap_manifests(mini_iemocap, tmp_path_factory):
    prep = _load_recipe("recipes/IEMOCAP/iemocap_prepare.py")
    out = tmp_path_factory.mktemp("iemocap_manifests")
    prep.prepare_iemocap(mini_iemocap.root, out)
    return out


@pytest.fixture(scope="session")
def harmonifuse_trained(mini_corpora, msp_manifests, libri_manifests, tmp_path_factory):
    """The folder of one HarmoniFuse recipe run (full row, tests/harmonifuse_run.py), shared by the recipe and
    export tests: defined here so that the session trains it once."""
    try:
        from harmonifuse_run import train_full_row
    except ImportError:  # pytest --import-mode=importlib
        from tests.harmonifuse_run import train_full_row
    return train_full_row(mini_corpora, msp_manifests, libri_manifests, tmp_path_factory.mktemp("harmonifuse"))
