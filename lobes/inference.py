"""Inference from a trained recipe: emotion (one probability per class of the recipe) and, with a CTC head, a
transcript per file.

    from tools.infer import load_model                          # experiments and folded AdaLTM exports
    model = load_model("exp/adaltm/setup4_dual/1986")          # or ".../folded_wavlm", device="cuda"
    for r in model.predict(["a.wav", "b.flac"]):
        print(r["file"], r["emotion"], r["probs"][r["emotion"]], r.get("transcript"), r["error"])

This module is the one experiment loader of every recipe (SER, ASR-CTC, MTL, AdaLTM, HarmoniFuse):
:func:`load_experiment` rebuilds the modules from the experiment's ``hyperparams.yaml`` (the effective hparams
SpeechBrain saved) and restores the checkpoint SpeechBrain's ``Checkpointer.find_checkpoint(min_key="loss")``
picks, the one the recipe tested. Relative paths in that file (``wavlm_source``, task vectors) are resolved
against the folder training ran from, found by matching ``output_folder`` against the experiment path;
``overrides`` (hyperpyyaml style, nested) fix paths of a moved experiment. AdaLTM checkpoints hold only λ, α and
the head, so W_base and the task vectors must still exist. :func:`recognizer_from_experiment` wraps the
encoder + heads into a :class:`Recognizer`; HarmoniFuse's infer.py adds its own ``predict`` to the experiment.
Paper packages are not imported here: folded AdaLTM exports are loaded by ``lobes.adaltm.fold_export``, and
``tools.infer.load_model`` picks the loader for a path.

Audio: any format libsndfile reads (wav, flac, ogg, mp3), any sample rate and channel count: channels are averaged
and the signal resampled to 16 kHz (``lobes.audio.read_audio(convert=True)``, logged once per call). Unreadable
files are reported in their result's ``error`` and skipped; the rest are still processed. Files are sorted by
duration and grouped into batches of at most ``batch_seconds`` of padded audio (padding costs memory and time,
not accuracy: pooling and attention are masked).
"""
import contextlib
import dataclasses
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from lobes import ctc_text
from lobes.audio import audio_info, read_audio
from lobes.errors import DataError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
def _probe(path):
    """``(sample_rate, num_frames, channels)`` from the header; DataError naming the file if it is unusable."""
    sr, frames, channels = audio_info(path)
    if frames <= 0 or sr <= 0:
        raise DataError(f"{path}: audio file has 0 samples")
    return sr, frames, channels


def find_audio_files(inputs, extensions=AUDIO_EXTENSIONS):
    """Files named in ``inputs`` (kept as given, even when missing: they are reported as failures) and audio files
    found recursively (sorted) in folders, deduplicated in order."""
    out, seen = [], set()
    for item in inputs:
        p = Path(item)
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions) \
            if p.is_dir() else [p]
        for f in found:
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                out.append(str(f))
    return out


def duration_batches(durations, batch_seconds):
    """Group items into batches of at most ``batch_seconds`` of *padded* audio (size x longest duration).

    Items are taken in ascending duration, so each batch holds similar lengths; an item longer than
    ``batch_seconds`` gets a batch of its own. Returns lists of indices into ``durations``.
    """
    if batch_seconds <= 0:
        raise ValueError(f"batch_seconds must be > 0, got {batch_seconds}")
    order = sorted(range(len(durations)), key=lambda i: durations[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * durations[i] > batch_seconds:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------------------------
def _min_samples(config):
    """Shortest input giving one output frame of WavLM's CNN (400 samples = 25 ms for WavLM-Large)."""
    n = 1
    for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        n = (n - 1) * s + k
    return n


class Recognizer:
    """Encoder (+ α weighted layer sum + emotion head) (+ CTC head) in eval mode on one device.

    ``encoder(wavs, wav_lens) -> (hidden [L+1, B, T, D], frame mask [B, T])`` as every recipe's ``wavlm`` module.
    """

    def __init__(self, encoder, weighted_sum=None, ser_head=None, ctc_head=None, classes=None, device="cpu",
                 description=""):
        if ser_head is None and ctc_head is None:
            raise DataError("the model has neither an emotion head (ser_head) nor a CTC head (ctc_head)")
        if ser_head is not None and weighted_sum is None:
            raise DataError("an emotion head needs the α weighted layer sum (weighted_sum)")
        if ser_head is not None and not classes:
            raise DataError("an emotion head needs its class names (the recipe's emotion_classes)")
        self.modules = torch.nn.ModuleDict({"encoder": encoder})
        for name, m in (("weighted_sum", weighted_sum), ("ser_head", ser_head), ("ctc_head", ctc_head)):
            if m is not None:
                self.modules[name] = m
        self.classes = list(classes or [])
        self.description = description
        self.device = torch.device(device)
        self.modules.to(self.device).eval()
        config = getattr(getattr(encoder, "model", None), "config", None)
        self.min_samples = _min_samples(config) if config is not None else 400  # 400 = WavLM's 25 ms

    @property
    def has_ser(self):
        return "ser_head" in self.modules

    @property
    def has_ctc(self):
        return "ctc_head" in self.modules

    @torch.no_grad()
    def forward(self, wavs, wav_lens):
        """Padded batch [B, samples] + relative lengths -> (class probabilities [B, C] or None, transcripts or None)."""
        hidden, mask = self.modules["encoder"](wavs.to(self.device), wav_lens.to(self.device))
        probs = texts = None
        if self.has_ser:
            logits = self.modules["ser_head"](self.modules["weighted_sum"](hidden), mask)
            if logits.shape[-1] != len(self.classes):
                raise DataError(f"the emotion head has {logits.shape[-1]} outputs but {len(self.classes)} classes "
                                f"are named ({self.classes})")
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        if self.has_ctc:
            log_probs = torch.log_softmax(self.modules["ctc_head"](hidden[-1]).float(), dim=-1)
            texts = ctc_text.ctc_greedy_decode(log_probs.cpu(), mask.sum(1).cpu())
        return probs, texts

    # -- files -----------------------------------------------------------------------------------------------
    def _failure(self, path, error):
        out = {"file": str(path), "duration": None, "sample_rate": None, "channels": None, "emotion": None,
               "probs": None, "error": str(error)}
        if self.has_ctc:
            out["transcript"] = None
        return out

    def _success(self, path, wav, sr, channels, probs, text):
        out = {"file": str(path), "duration": round(wav.numel() / SAMPLE_RATE, 3), "sample_rate": sr,
               "channels": channels, "emotion": None, "probs": None, "error": None}
        if probs is not None:
            out["probs"] = {c: float(p) for c, p in zip(self.classes, probs.tolist())}
            out["emotion"] = self.classes[int(probs.argmax())]
        if self.has_ctc:
            out["transcript"] = text
        return out

    def _run(self, items):
        """items: [(index, path, wav, sr, channels)] -> {index: result}; a failing batch is retried file by file."""
        wavs = [w for _, _, w, _, _ in items]
        lens = torch.tensor([w.numel() for w in wavs], dtype=torch.float)
        batch = torch.zeros(len(wavs), int(lens.max()))
        for b, w in enumerate(wavs):
            batch[b, : w.numel()] = w
        try:
            probs, texts = self.forward(batch, lens / lens.max())
        except (RuntimeError, ValueError) as e:  # e.g. out of memory on a long batch
            if len(items) > 1:
                out = {}
                for item in items:
                    out.update(self._run([item]))
                return out
            i, path = items[0][:2]
            return {i: self._failure(path, f"{path}: inference failed ({type(e).__name__}: {e})")}
        return {i: self._success(path, w, sr, ch, None if probs is None else probs[b], None if texts is None
                                 else texts[b]) for b, (i, path, w, sr, ch) in enumerate(items)}

    def _decode(self, path):
        """The file as a mono 16 kHz tensor, or DataError (unreadable, too short for one frame)."""
        wav = read_audio(path, SAMPLE_RATE, convert=True)
        if wav.numel() < self.min_samples:
            raise DataError(f"{path}: too short ({wav.numel()} samples at 16 kHz; the model needs at least "
                            f"{self.min_samples})")
        return wav

    def predict(self, paths, batch_seconds=60.0, progress=True):
        """Predict every file; returns one dict per path, in input order.

        Keys: ``file``, ``duration`` (s, at 16 kHz), ``sample_rate`` / ``channels`` (of the file), ``emotion``
        (argmax class), ``probs`` ({class: probability}, the recipe's classes), ``transcript`` (models with a CTC head),
        ``error`` (None, or why the file was skipped: then the prediction keys are None).
        """
        from tqdm import tqdm

        paths = [str(p) for p in paths]
        results = [None] * len(paths)
        todo, durations, headers = [], [], {}
        for i, p in enumerate(paths):
            try:
                sr, frames, ch = _probe(p)
            except DataError as e:
                results[i] = self._failure(p, e)
                continue
            todo.append(i)
            durations.append(frames / sr)
            headers[i] = (sr, ch)
        batches = duration_batches(durations, batch_seconds) if todo else []
        told = False
        with tqdm(total=len(todo), unit="file", desc="inference", disable=not progress or len(batches) < 2,
                  leave=False) as bar:
            for batch in batches:
                items = []
                for i in (todo[j] for j in batch):
                    try:
                        wav = self._decode(paths[i])
                    except DataError as e:
                        results[i] = self._failure(paths[i], e)
                        continue
                    sr, ch = headers[i]
                    if (sr != SAMPLE_RATE or ch != 1) and not told:
                        logger.info("input audio is downmixed to mono and resampled to 16 kHz before inference "
                                    "(first such file: %s, %d Hz, %d channel(s)); further files are not logged",
                                    paths[i], sr, ch)
                        told = True
                    items.append((i, paths[i], wav, sr, ch))
                if items:
                    for i, r in self._run(items).items():
                        results[i] = r
                bar.update(len(batch))
        for r in results:
            if r["error"]:
                logger.warning("skipped %s", r["error"])
        return results


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _working_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _kept_rng():
    """Loading hparams runs ``seed_everything``; the caller's random streams are left as they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def training_root(exp_dir, output_folder):
    """The folder training ran from: the experiment path minus the (relative) ``output_folder`` it was given.

    Falls back to the current directory when ``output_folder`` is absolute or does not match (a moved experiment).
    """
    exp_parts = Path(exp_dir).resolve().parts
    rel = os.path.normpath(str(output_folder)) if output_folder else ""
    if rel and not os.path.isabs(rel) and not rel.startswith(".."):
        parts = Path(rel).parts
        if len(parts) < len(exp_parts) and exp_parts[-len(parts):] == parts:
            return Path(*exp_parts[: -len(parts)])
    return Path.cwd()


def find_experiment(path):
    """The experiment folder at ``path``: it holds ``hyperparams.yaml``, or holds exactly one folder that does
    (``exp/.../setup4_dual`` with its ``1986/`` seed folder). DataError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such model directory")
    if (path / "hyperparams.yaml").is_file():
        return path.resolve()
    below = sorted(p.parent for p in path.glob("*/hyperparams.yaml"))
    if len(below) == 1:
        return below[0].resolve()
    if len(below) > 1:
        raise DataError(f"{path}: holds several experiments ({', '.join(p.name for p in below)}); name one")
    raise DataError(f"{path}: not an experiment directory (hyperparams.yaml + save/)")


@dataclasses.dataclass
class Experiment:
    """A trained recipe rebuilt from its folder: ``hparams`` as training built them (modules included), with the
    weights of ``checkpoint`` (a SpeechBrain ``Checkpoint``: path, meta, files) loaded into them."""

    path: Path
    hparams: dict
    checkpoint: object

    @property
    def modules(self):
        return self.hparams["modules"]


def _load_overrides(exp_dir, preview, overrides):
    """hyperpyyaml overrides for rebuilding a saved experiment: leftover !PLACEHOLDERs filled, the checkpointer
    pointed at this experiment's save/ (it creates its folder when built), then the caller's (nested) overrides."""
    merged = {}
    for key, value in preview.items():  # a !PLACEHOLDER left in the file must not stop inference
        if getattr(getattr(value, "tag", None), "value", None) == "!PLACEHOLDER":
            merged[key] = str(exp_dir)
    if "checkpointer" in preview:
        merged["checkpointer"] = {"checkpoints_dir": str(exp_dir / "save")}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _rebuild_hparams(exp_dir, overrides):
    """The hparams (modules built, untrained weights) of ``<exp_dir>/hyperparams.yaml``."""
    import ruamel.yaml
    from hyperpyyaml import load_hyperpyyaml

    hp_file = exp_dir / "hyperparams.yaml"
    text = hp_file.read_text()
    try:
        preview = ruamel.yaml.YAML().load(text) or {}
    except Exception as e:
        raise DataError(f"{hp_file}: not valid YAML ({e})") from e
    root = training_root(exp_dir, preview.get("output_folder"))
    try:
        with _working_dir(root), _kept_rng():
            return load_hyperpyyaml(text, _load_overrides(exp_dir, preview, overrides))
    except DataError as e:
        raise DataError(f"{hp_file}: cannot rebuild the model ({e}); relative paths are read from {root}; "
                        "pass overrides for moved files") from e
    except Exception as e:
        raise DataError(f"{hp_file}: cannot rebuild the model ({type(e).__name__}: {e}); relative paths are "
                        f"read from {root}") from e


def best_checkpoint(save_dir, min_key="loss"):
    """The ``Checkpoint`` (path, meta, files) of ``save_dir`` that SpeechBrain's ``find_checkpoint(min_key=...)``
    picks: lowest ``min_key``, ties to the most recent; the one the recipes test (``evaluate(min_key="loss")``)."""
    from lobes.checkpointing import AtomicCheckpointer

    save_dir = Path(save_dir)
    ckpt = None
    if save_dir.is_dir():  # a Checkpointer creates its folder: do not leave one behind a wrong path
        ckpt = AtomicCheckpointer(save_dir, save_rng_state=False).find_checkpoint(min_key=min_key)
    if ckpt is None:
        raise DataError(f"{save_dir}: no CKPT+*/CKPT.yaml with a '{min_key}' value; was the experiment trained "
                        "for at least one epoch?")
    return ckpt


def restore_best(hparams, weights=None, min_key="loss", where=""):
    """Load into the modules the weights of the :func:`best_checkpoint` of the experiment's checkpointer.

    ``weights``: the names of the checkpointer's recoverables to load; default, every ``torch.nn.Module`` one. The
    epoch counter, schedulers and RNG state are left alone (the caller's random streams stay as they were).
    Returns the ``Checkpoint``.
    """
    from lobes.checkpointing import AtomicCheckpointer

    if "checkpointer" not in hparams:
        raise DataError(f"{where}: no checkpointer; cannot tell which weights were trained")
    recoverables = hparams["checkpointer"].recoverables
    names = list(weights) if weights is not None else [n for n, obj in recoverables.items()
                                                      if isinstance(obj, torch.nn.Module)]
    unknown = [n for n in names if n not in recoverables]
    if unknown or not names:
        raise DataError(f"{where}: the checkpointer has no recoverable {unknown or 'module'} to load "
                        f"(it has {sorted(recoverables)})")
    ckpt = best_checkpoint(hparams["checkpointer"].checkpoints_dir, min_key)
    # a checkpointer of the weights alone, with SpeechBrain's load hooks (safe torch.load, strict state dicts)
    AtomicCheckpointer(ckpt.path.parent, {n: recoverables[n] for n in names},
                       save_rng_state=False).load_checkpoint(ckpt)
    return ckpt


def load_experiment(path, overrides=None, weights=None, min_key="loss"):
    """Rebuild a recipe's modules from ``<path>/hyperparams.yaml`` and restore its best checkpoint.

    ``path``: an experiment folder (or a folder holding exactly one, see :func:`find_experiment`). ``overrides``:
    nested hyperpyyaml overrides applied to the saved hparams, e.g. ``{"wavlm": {"source": "/models/wavlm-large"}}``
    when the experiment was moved (references are already resolved in the saved file, so override the module's
    own key). ``weights`` / ``min_key``: see :func:`restore_best`. Modules stay on the CPU.
    """
    exp_dir = find_experiment(path)
    hparams = _rebuild_hparams(exp_dir, overrides)
    if "modules" not in hparams:
        raise DataError(f"{exp_dir / 'hyperparams.yaml'}: no 'modules'")
    ckpt = restore_best(hparams, weights, min_key, where=str(exp_dir / "hyperparams.yaml"))
    logger.info("loaded experiment %s (checkpoint %s)", exp_dir, ckpt.path.name)
    return Experiment(exp_dir, hparams, ckpt)


def recognizer_from_experiment(exp, device="cpu", encoder=None):
    """A :class:`Recognizer` over an SER / ASR-CTC / MTL / AdaLTM experiment's ``wavlm`` (or ``encoder``, e.g. a
    folded copy of it) and its heads."""
    hp_file = exp.path / "hyperparams.yaml"
    modules = exp.modules
    if "wavlm" not in modules:
        raise DataError(f"{hp_file}: no 'wavlm' module in 'modules'")
    classes = None
    if "ser_head" in modules:
        if "emotion_classes" not in exp.hparams or not exp.hparams["emotion_classes"]:
            raise DataError(f"{hp_file}: has an emotion head (ser_head) but no 'emotion_classes'")
        classes = exp.hparams["emotion_classes"]
    return Recognizer(modules["wavlm"] if encoder is None else encoder, modules.get("weighted_sum"),
                      modules.get("ser_head"), modules.get("ctc_head"), classes=classes, device=device,
                      description=f"experiment {exp.path} ({exp.checkpoint.path.name})")
