"""Bad-input matrix at training time, safe loading and atomic checkpoints (docs/BAD_INPUTS.md lists them all).

Each bad input goes through what the recipes call: ``lobes.dataio.ser_datasets`` / ``asr_datasets`` and a
SpeechBrain loader (every train.py), ``lobes.hparams_io.load_hparams`` on an AdaLTM row (which builds the merged
WavLM from the task vectors), the AdaLTM ``AdaLTMBrain`` in-process, and the AdaLTM train.py as a subprocess for
the wrong-architecture task vector. Each must raise an error naming the file / key / utterance and leave nothing
half-written behind.

Bad inputs caught at data preparation (corrupt / 0-sample / 8 kHz audio, label row whose audio file is missing,
unknown EmoClass letter, LibriSpeech mismatches) are tested in
tests/test_prepare.py (``test_msp_bad_inputs``, ``test_libri_bad_inputs``); pickled objects and truncated files
given to ``lobes.adaltm.checkpoint_import`` in tests/test_checkpoint_import.py. They are not repeated here.
"""
import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lobes.checkpointing import AtomicCheckpointer, NonFiniteCheckpointError
from lobes.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
ADALTM = "recipes/MSP-Podcast/adaltm/train.py"
ROW = ROOT / "recipes/MSP-Podcast/adaltm/hparams/rows/setup4_dual.yaml"
SUBSET = {"train": 6, "valid": 2, "test": 2}
MSP_CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise"]


# ------------------------------------------------------------------------------------------------- helpers
def debris(folder):
    """Half-written files / dirs anywhere under ``folder`` (atomic writers' temp names)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".trash-"))
                  or (p.name.startswith(".") and ".tmp" in p.name))


def subset_manifests(msp_manifests, folder, edit=None):
    """The first utterances (sorted ids) of each mini-corpus manifest, every one with a transcript (as in the
    transcript subset the CTC recipes use); ``edit(split, manifest)`` may then alter them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in SUBSET.items():
        full = json.loads((msp_manifests / f"{split}.json").read_text())
        man = {k: full[k] for k in sorted(full)[:n]}
        for entry in man.values():
            entry.setdefault("wrd", "SOME WORDS")
        if edit:
            edit(split, man)
        paths[split] = str(folder / f"{split}.json")
        Path(paths[split]).write_text(json.dumps(man))
    return paths


def write_wav(path, n=8000, sr=16000):
    x = np.random.default_rng(0).uniform(-0.3, 0.3, n).astype(np.float32)
    sf.write(str(path), x, sr, subtype="PCM_16")
    return path


def first_batch(dataset):
    import speechbrain as sb

    return next(iter(sb.dataio.dataloader.make_dataloader(dataset, batch_size=2)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny 4-layer WavLM, two task vectors for it, and one for a 6-layer WavLM (another architecture)."""
    from tools.make_tiny_wavlm import make_tiny_wavlm
    from transformers import WavLMModel

    from lobes.adaltm.task_vector import compute_task_vector, save_task_vector

    root = tmp_path_factory.mktemp("reliability")
    g = torch.Generator().manual_seed(3)

    def vector(wavlm_dir, name, out):
        base = WavLMModel.from_pretrained(wavlm_dir).state_dict()
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.items()}
        return save_task_vector(compute_task_vector(base, ft, name), out)

    wavlm = make_tiny_wavlm(root / "tiny_wavlm")
    wavlm6 = make_tiny_wavlm(root / "tiny_wavlm_6layers", num_layers=6)
    for name in ("asr_in", "ser"):
        vector(wavlm, name, root / "vectors" / f"{name}.safetensors")
    vector(wavlm6, "asr_in", root / "vectors_6layers" / "asr_in.safetensors")
    (root / "vectors_6layers" / "ser.safetensors").write_bytes((root / "vectors" / "ser.safetensors").read_bytes())
    return root


def adaltm_overrides(tiny, exp, prep, vectors=None):
    return (f"data_folder: {exp}/unused\nprep_folder: {prep}\nskip_prep: True\nwavlm_source: {tiny / 'tiny_wavlm'}\n"
            f"vectors_folder: {vectors or tiny / 'vectors'}\nexp_folder: {exp}\nnumber_of_epochs: 1\n"
            "batch_size: 2\nhead_hidden: 16\nnum_bootstraps: 20\n")


# -------------------------------------------------------------------------------- audio at training time
@pytest.mark.parametrize("defect, message", [
    ("corrupt", "unreadable or corrupt audio file"),
    ("empty", "audio file has 0 samples"),
    ("wrong_sr", "sample rate 8000 Hz, expected 16000 Hz"),
])
def test_bad_audio_in_a_manifest_fails_at_training_time_naming_the_file(msp_manifests, tmp_path, defect, message):
    from lobes.dataio import asr_datasets, ser_datasets

    bad = tmp_path / f"{defect}.wav"
    if defect == "corrupt":
        bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage, not a wave file" * 3)
    else:
        write_wav(bad, n=0 if defect == "empty" else 8000, sr=8000 if defect == "wrong_sr" else 16000)

    def point_first_at_bad(split, man):
        if split == "train":
            man[sorted(man)[0]]["wav"] = str(bad)

    manifests = subset_manifests(msp_manifests, tmp_path / "prep", point_first_at_bad)
    # SER/AdaLTM/MTL and the CTC recipes share the audio pipeline
    for build in (lambda m: ser_datasets(m, MSP_CLASSES), asr_datasets):
        with pytest.raises(DataError, match=re.escape(f"{bad}: {message}")):
            first_batch(build(manifests)["train"])
    assert debris(tmp_path) == []


# ------------------------------------------------------------------------------------- labels / transcripts
@pytest.mark.parametrize("key, value, message", [
    ("emo", "Boredom", "unknown emotion class 'Boredom'"),
    ("emo_soft", [float("nan")] + [0.0] * 7, "emo_soft [nan, 0.0"),
    ("emo_soft", [0.5, 0.5], "emo_soft [0.5, 0.5] is not 8 finite non-negative numbers summing to 1"),
])
def test_bad_emotion_label_in_a_manifest_names_manifest_and_utterance(msp_manifests, tmp_path, key, value, message):
    from lobes.dataio import class_counts, ser_datasets

    target = {}

    def corrupt(split, man):
        if split == "valid":
            target["utt"] = utt = sorted(man)[1]
            man[utt][key] = value

    manifests = subset_manifests(msp_manifests, tmp_path, corrupt)
    expected = f"manifest '{manifests['valid']}': utterance '{target['utt']}': " + re.escape(message)
    with pytest.raises(DataError, match=expected):
        ser_datasets(manifests, MSP_CLASSES)  # before any training step: a NaN soft label never becomes a NaN loss
    if key == "emo":
        with pytest.raises(DataError, match=expected):
            class_counts(manifests["valid"], MSP_CLASSES)


@pytest.mark.parametrize("case, message", [
    ("missing", "lacks ['wrd']"),
    ("empty", "empty transcript ('wrd')"),
    ("unnormalised", "characters outside the CTC alphabet ['!', 'e', 'h', 'l', 'o']"),
])
def test_bad_transcript_in_a_ctc_manifest_names_manifest_and_utterance(msp_manifests, tmp_path, case, message):
    from lobes.dataio import asr_datasets, ser_datasets

    target = {}

    def corrupt(split, man):
        if split == "train":
            target["utt"] = utt = sorted(man)[2]
            if case == "missing":
                del man[utt]["wrd"]
            else:
                man[utt]["wrd"] = {"empty": "  ", "unnormalised": "hello!"}[case]

    manifests = subset_manifests(msp_manifests, tmp_path, corrupt)
    expected = re.escape(f"manifest '{manifests['train']}': utterance '{target['utt']}'") + ".*" + re.escape(message)
    with pytest.raises(DataError, match=expected):
        asr_datasets(manifests)
    with pytest.raises(DataError, match=expected):  # the MTL recipe's SER + CTC datasets
        ser_datasets(manifests, MSP_CLASSES, with_text=True)


# ----------------------------------------------------------------------------------------- task vectors
def test_task_vector_of_another_architecture_stops_adaltm_train_py(tiny, msp_manifests, tmp_path):
    prep = Path(subset_manifests(msp_manifests, tmp_path / "prep")["train"]).parent
    exp = tmp_path / "exp"
    vec = tiny / "vectors_6layers" / "asr_in.safetensors"
    cmd = [sys.executable, str(ROOT / ADALTM), str(ROW), "--device=cpu", "--noprogressbar"] + [
        f"--{line.replace(': ', '=', 1)}"
        for line in adaltm_overrides(tiny, exp, prep, tiny / "vectors_6layers").strip().splitlines()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lobes.errors.DataError: task vector 'ASR' ({vec}) does not fit the base model")
    # the keys are named (layers 4 and 5 exist only in the 6-layer model; the first 20 are listed)
    assert "(unexpected keys: encoder.layers.4.attention.gru_rel_pos_const, " in last
    assert re.search(r"encoder\.layers\.5\.\S+ \.\.\. \(\+\d+ more\)\)$", last)
    assert not exp.exists()  # stopped before the experiment folder: no metrics.json, no checkpoint, no plots
    assert debris(tmp_path) == [] and debris(tiny) == []


def test_truncated_task_vector_names_the_file(tiny, msp_manifests, tmp_path):
    from lobes.hparams_io import load_hparams
    from lobes.adaltm.task_vector import load_task_vector

    vectors = tmp_path / "vectors"
    vectors.mkdir()
    good = (tiny / "vectors" / "ser.safetensors").read_bytes()
    (vectors / "ser.safetensors").write_bytes(good[: len(good) // 2])
    (vectors / "asr_in.safetensors").write_bytes((tiny / "vectors" / "asr_in.safetensors").read_bytes())
    bad = vectors / "ser.safetensors"
    expected = re.escape(f"{bad}: task vector file is truncated: its header declares ") + r"\d+ bytes of tensor data"
    with pytest.raises(DataError, match=expected):
        load_task_vector(bad)
    prep = Path(subset_manifests(msp_manifests, tmp_path / "prep")["train"]).parent
    with pytest.raises(DataError, match=expected):  # what train.py does first: build the merged WavLM
        load_hparams(ROW, adaltm_overrides(tiny, tmp_path / "exp", prep, vectors))
    assert debris(tmp_path) == []


# -------------------------------------------------------------------------------------------- NaN loss
def test_nan_loss_stops_adaltm_training_naming_the_batch_and_saves_no_checkpoint(
        tiny, msp_manifests, tmp_path, load_recipe):
    from lobes.brains import NonFiniteLossError
    from lobes.dataio import class_counts, ser_datasets
    from lobes.hparams_io import load_hparams

    manifests = subset_manifests(msp_manifests, tmp_path / "prep")
    train_ids = sorted(json.loads(Path(manifests["train"]).read_text()))
    hparams, _, _ = load_hparams(ROW, adaltm_overrides(tiny, tmp_path / "exp", Path(manifests["train"]).parent))
    recipe = load_recipe(ADALTM)
    datasets = ser_datasets(manifests, hparams["emotion_classes"])
    hparams["loss"].set_counts(class_counts(manifests["train"], hparams["emotion_classes"]))
    brain = recipe.AdaLTMBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                               run_opts={"device": "cpu", "ckpt_interval_steps": 1, "noprogressbar": True},
                               checkpointer=hparams["checkpointer"])
    poisoned = train_ids[4]  # batches of 2 in manifest order: the 3rd step
    objectives = brain.compute_objectives

    def nan_for_poisoned(logits, batch, stage):
        loss = objectives(logits, batch, stage)
        return loss * float("nan") if poisoned in batch.id else loss

    brain.compute_objectives = nan_for_poisoned
    with pytest.raises(NonFiniteLossError) as err:
        brain.fit(hparams["epoch_counter"], datasets["train"], datasets["valid"],
                  train_loader_kwargs={"batch_size": 2, "shuffle": False})
    assert str(err.value).startswith("non-finite training loss (nan) at step 3 of epoch 1; batch utterances: "
                                     f"{train_ids[4]}, {train_ids[5]}.")
    # Only the intra-epoch checkpoint of step 2 exists; the poisoned step wrote nothing and changed no weight.
    save = Path(hparams["save_folder"])
    (ckpt,) = [d for d in save.iterdir()]
    assert ckpt.name.startswith("CKPT+")
    assert "step: 2" in (ckpt / "brain.ckpt").read_text() and (ckpt / "dataloader-TRAIN.ckpt").read_text() == "2"
    saved = torch.load(ckpt / "lambdas.ckpt", weights_only=True)
    live = hparams["wavlm"].lambdas.state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())
    assert not (Path(hparams["output_folder"]) / "metrics.json").exists()
    assert debris(tmp_path) == []


def test_checkpointer_refuses_nan_weights(tmp_path):
    head = torch.nn.Linear(3, 2)
    ckpt = AtomicCheckpointer(tmp_path / "save", {"ser_head": head})
    ckpt.save_checkpoint()
    with torch.no_grad():
        head.bias[1] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match="NaN/inf weights in 'ser_head': bias"):
        ckpt.save_checkpoint()
    assert len(ckpt.list_checkpoints()) == 1 and debris(tmp_path) == []


# --------------------------------------------------------------------------------------- checkpoint files
@pytest.fixture()
def recipe_checkpointer(tiny, msp_manifests, tmp_path):
    """The AdaLTM row's own checkpointer (λ, α, head, epoch counter) after one saved checkpoint."""
    from lobes.hparams_io import load_hparams

    prep = Path(subset_manifests(msp_manifests, tmp_path / "prep")["train"]).parent
    hparams, _, _ = load_hparams(ROW, adaltm_overrides(tiny, tmp_path / "exp", prep))
    ckpt = hparams["checkpointer"].save_checkpoint(meta={"loss": 1.0})
    return hparams, ckpt


BASE_YAMLS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("recipes/*/*/hparams/*.yaml"))


@pytest.fixture(scope="module")
def registry_models(tmp_path_factory):
    """Tiny WavLM and causal LM, and task vectors asr_in / asr_out / ser of the WavLM (what the YAMLs name)."""
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm
    from transformers import WavLMModel

    from lobes.adaltm.task_vector import compute_task_vector, save_task_vector

    root = tmp_path_factory.mktemp("recipe_checkpointers")
    wavlm = make_tiny_wavlm(root / "tiny_wavlm")
    base = WavLMModel.from_pretrained(wavlm).state_dict()
    for name, file in (("ASR", "asr_in"), ("ASR", "asr_out"), ("SER", "ser")):
        save_task_vector(compute_task_vector(base, {k: v + 0.01 for k, v in base.items()}, name),
                         root / "vectors" / f"{file}.safetensors")
    return {"wavlm_source": str(wavlm), "lm_source": str(make_tiny_lm(root / "tiny_lm")),
            "vectors_folder": str(root / "vectors")}


class _Killed(BaseException):
    """Stands for SIGKILL in-process: raised after the disk state of the kill moment was copied away."""


@pytest.mark.parametrize("yaml_file", BASE_YAMLS)
def test_every_recipe_survives_a_save_killed_half_way(yaml_file, registry_models, tmp_path, monkeypatch):
    """What a user sees when a run is killed while it writes a checkpoint, for the checkpointer each recipe's
    YAML builds: no half-written ``CKPT+`` folder is left, and resuming finds the last complete checkpoint.

    A SIGKILL runs no cleanup, so the disk it leaves is the disk at the moment of the kill: the last save hook
    copies the checkpoint folder away at that moment, and the assertions run on that copy. (A real kill, in a
    child process, is :func:`test_killed_save_leaves_no_checkpoint_and_is_cleaned_at_next_start`; forking the
    suite's own process here deadlocked CI on a lock held by another thread.)"""
    import shutil

    import ruamel.yaml

    from lobes.hparams_io import load_hparams

    keys = ruamel.yaml.YAML().load(ROOT / yaml_file)
    overrides = {k: str(tmp_path / k) for k in keys if k.endswith("_folder")}
    overrides.update({k: v for k, v in registry_models.items() if k in keys})
    monkeypatch.chdir(tmp_path)  # relative paths of the YAML land here
    hparams, _, _ = load_hparams(ROOT / yaml_file, overrides)
    checkpointer = hparams["checkpointer"]
    save = Path(checkpointer.checkpoints_dir)
    first = checkpointer.save_checkpoint(meta={"loss": 2.0})
    at_kill = tmp_path / "at_kill"

    def dies(obj, path):  # every recoverable of the YAML written, then killed while writing one more file
        Path(path).write_bytes(b"half a file")
        shutil.copytree(save, at_kill)
        raise _Killed

    checkpointer.add_recoverable("z_dies", object(), custom_save_hook=dies, custom_load_hook=lambda *a: None)
    with pytest.raises(_Killed):
        checkpointer.save_checkpoint(meta={"loss": 1.0})
    del checkpointer.recoverables["z_dies"]
    shutil.rmtree(save)
    shutil.copytree(at_kill, save)  # the disk as the kill left it
    assert [p.name for p in save.glob("CKPT+*")] == [first.path.name]
    assert checkpointer.recover_if_possible().path == first.path


def test_truncated_checkpoint_file_names_the_file(recipe_checkpointer):
    hparams, ckpt = recipe_checkpointer
    checkpointer = hparams["checkpointer"]
    lam = hparams["wavlm"].lambdas
    with torch.no_grad():
        lam.lam.add_(1.0)
    assert checkpointer.recover_if_possible() is not None  # intact: λ back to its saved value 0.5
    assert bool((lam.lam == 0.5).all())
    target = ckpt.path / "lambdas.ckpt"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"{target}: cannot load the checkpoint file of 'lambdas'")
                       + ".*" + re.escape(f"delete {ckpt.path} to resume from an earlier checkpoint")):
        checkpointer.recover_if_possible()
    (ckpt.path / "counter.ckpt").write_text("")  # a hand-truncated text file too
    target.write_bytes(data)
    with pytest.raises(DataError, match=re.escape(f"{ckpt.path / 'counter.ckpt'}: cannot load")):
        checkpointer.recover_if_possible()
    (ckpt.path / "CKPT.yaml").write_text("end-of-epoch: [unclosed\n")
    with pytest.raises(DataError, match=re.escape(f"{ckpt.path / 'CKPT.yaml'}: unreadable checkpoint metadata")):
        checkpointer.recover_if_possible()


def test_checkpoint_missing_a_recoverable_file_names_it(recipe_checkpointer):
    hparams, ckpt = recipe_checkpointer
    (ckpt.path / "ser_head.ckpt").unlink()
    with pytest.raises(DataError, match=re.escape(f"{ckpt.path}: checkpoint has no file for recoverable "
                                                  "'ser_head' (ser_head.ckpt)")):
        hparams["checkpointer"].recover_if_possible()


class _Payload:
    """Unpickling this would create a directory: the proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickle_bearing_files_are_refused_and_never_run(recipe_checkpointer, tmp_path):
    from lobes.adaltm.task_vector import load_task_vector

    hparams, ckpt = recipe_checkpointer
    marker = tmp_path / "pickled_code_ran"
    target = ckpt.path / "ser_head.ckpt"
    state = torch.load(target, weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, target)  # a real state dict plus one pickled object
    with pytest.raises(DataError, match=re.escape(f"{target}: cannot load the checkpoint file of 'ser_head'")
                       + r".*UnpicklingError.*weights_only=True"):
        hparams["checkpointer"].recover_if_possible()
    vector = tmp_path / "evil.safetensors"
    torch.save({"encoder.layer_norm.weight": torch.zeros(2), "x": _Payload(marker)}, vector)
    with pytest.raises(DataError, match=re.escape(f"{vector}: task vector file is truncated or not a safetensors file")):
        load_task_vector(vector)
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    """Static check over our sources (the developer guide's rule: every torch.load passes weights_only=True)."""
    offenders = []
    for folder in ("lobes", "recipes", "tools", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    flag = [k for k in node.keywords if k.arg == "weights_only"]
                    if not (flag and isinstance(flag[0].value, ast.Constant) and flag[0].value.value is True):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_a_plain_speechbrain_checkpointer_refuses_pickles_too(tmp_path, monkeypatch):
    """SpeechBrain's own load hooks call torch.load without weights_only, which unpickles on torch < 2.6 (and
    wherever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, set here to be that torch). Once lobes is imported, a plain
    SpeechBrain Checkpointer (a user's script, the Pretrainer's path) still refuses a pickle-bearing module,
    optimizer or scheduler file, and the pickled code never runs."""
    from speechbrain.utils.checkpoints import Checkpointer

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pickled_code_ran"
    head = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for name, obj in (("head", head), ("opt", opt), ("sched", torch.optim.lr_scheduler.StepLR(opt, 1))):
        ck = Checkpointer(tmp_path / name, {name: obj})
        target = ck.save_checkpoint().path / f"{name}.ckpt"
        torch.save({**torch.load(target, weights_only=True), "extra": _Payload(marker)}, target)
        with pytest.raises(Exception, match="weights_only|Unsupported global|GLOBAL"):
            ck.recover_if_possible()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- atomic checkpoints
KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from lobes.checkpointing import AtomicCheckpointer

def dies(obj, path):
    Path(path).write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

head = torch.nn.Linear(3, 2)
head.load_state_dict(torch.load(sys.argv[2], weights_only=True))
with torch.no_grad():
    head.weight.mul_(-1)
ck = AtomicCheckpointer(sys.argv[1], {"ser_head": head, "z_dies": object()}, custom_save_hooks={"z_dies": dies})
ck.save_checkpoint(meta={"loss": 1.0})
"""


def test_killed_save_leaves_no_checkpoint_and_is_cleaned_at_next_start(tmp_path):
    save = tmp_path / "save"
    head = torch.nn.Linear(3, 2)
    first = AtomicCheckpointer(save, {"ser_head": head}).save_checkpoint(meta={"loss": 2.0})
    weights = head.weight.detach().clone()
    torch.save(head.state_dict(), tmp_path / "head.pt")
    # A child process whose save is killed half-way (SIGKILL: no Python cleanup runs). Not os.fork: a fork of
    # the suite's process can deadlock on a lock another thread holds.
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(save), str(tmp_path / "head.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    tmp_dirs = [p.name for p in save.iterdir() if p.name.startswith(".tmp-CKPT+")]
    assert len(tmp_dirs) == 1 and not (save / tmp_dirs[0] / "CKPT.yaml").exists()
    assert [p.name for p in save.glob("CKPT+*")] == [first.path.name]  # the half-written one is not listed

    # Next start: the half-written directory is removed; recovery gets the complete (older) checkpoint.
    with torch.no_grad():
        head.weight.zero_()
    ck = AtomicCheckpointer(save, {"ser_head": head})
    assert sorted(p.name for p in save.iterdir()) == [first.path.name]
    assert ck.recover_if_possible().path == first.path and torch.equal(head.weight, weights)


def test_interrupted_save_and_delete_debris(tmp_path):
    save = tmp_path / "save"
    head = torch.nn.Linear(3, 2)
    ck = AtomicCheckpointer(save, {"ser_head": head})
    old = ck.save_checkpoint(meta={"loss": 2.0}, name="old")

    def interrupted(obj, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    ck.add_recoverable("z", object(), custom_save_hook=interrupted, custom_load_hook=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(meta={"loss": 1.0})
    assert sorted(p.name for p in save.iterdir()) == ["CKPT+old"]  # temp dir removed on the way out

    # What a kill can leave: a complete save not yet renamed (CKPT.yaml is written last, so it is complete), a
    # checkpoint half-deleted by plain SpeechBrain (files gone, no CKPT.yaml), and a trash directory.
    done = save / ".tmp-CKPT+done"
    done.mkdir()
    for f in old.path.iterdir():
        (done / f.name).write_bytes(f.read_bytes())
    (done / "CKPT.yaml").write_text((old.path / "CKPT.yaml").read_text().replace("loss: 2.0", "loss: 0.5"))
    (save / "CKPT+half_deleted").mkdir()
    (save / "CKPT+half_deleted" / "ser_head.ckpt").write_bytes(b"x")
    (save / ".trash-CKPT+gone").mkdir()
    # ... while a save that a live process is writing (here: our parent's pid) is left alone
    live = save / ".tmp-CKPT+live"
    live.mkdir()
    (live / ".writer").write_text(f"{socket.gethostname()} {os.getppid()}\n")
    ck2 = AtomicCheckpointer(save, {"ser_head": head})
    assert sorted(p.name for p in save.iterdir()) == [".tmp-CKPT+live", "CKPT+done", "CKPT+old"]
    finished = subprocess.Popen(["true"])
    finished.wait()
    (live / ".writer").write_text(f"{socket.gethostname()} {finished.pid}\n")  # its writer is gone
    ck2 = AtomicCheckpointer(save, {"ser_head": head})
    assert sorted(p.name for p in save.iterdir()) == ["CKPT+done", "CKPT+old"]
    assert ck2.find_checkpoint(min_key="loss").meta["loss"] == 0.5
    ck2.delete_checkpoints(num_to_keep=1, min_keys=["loss"], importance_keys=[])
    assert sorted(p.name for p in save.iterdir()) == ["CKPT+done"]  # the worse one went, via a trash rename
    assert debris(tmp_path) == []
