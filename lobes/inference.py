"""Inference from a trained recipe: emotion (one probability per class of the recipe) and, with a CTC head, a
transcript per file.

    from lobes.inference import load_model
    model = load_model("exp/adaltm/setup4_dual/1986")          # or ".../folded_wavlm", device="cuda"
    for r in model.predict(["a.wav", "b.flac"]):
        print(r["file"], r["emotion"], r["probs"][r["emotion"]], r.get("transcript"), r["error"])

``load_model`` accepts
- an experiment directory of the SER, AdaLTM or MTL recipes (ASR-CTC works too: transcripts only). Its
  ``hyperparams.yaml`` (the effective hparams SpeechBrain saved) rebuilds the modules and the checkpoint with the
  lowest validation ``loss`` (the one the recipe tested) is loaded. Relative paths in that file (``wavlm_source``,
  task vectors) are resolved against the folder training ran from, found by matching ``output_folder`` against
  the experiment path; ``overrides`` (hyperpyyaml style, nested) fix paths of a moved experiment. AdaLTM
  checkpoints hold only λ, α and the head, so W_base and the task vectors must still exist.
- a folded AdaLTM export (``folded_wavlm/``: a plain HF ``WavLMModel`` + ``downstream.safetensors`` +
  ``downstream.json``).

Audio: any format libsndfile reads (wav, flac, ogg, mp3), any sample rate and channel count: channels are averaged
and the signal resampled to 16 kHz (logged once per call). Unreadable files are reported in their result's
``error`` and skipped; the rest are still processed. Files are sorted by duration and grouped into batches of at
most ``batch_seconds`` of padded audio (padding costs memory and time, not accuracy: pooling and attention are
masked).
"""
import contextlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from lobes import ctc_text
from lobes.errors import DataError
from lobes.wavlm_encoder import run_wavlm

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
def probe_audio(path):
    """``(sample_rate, num_frames, channels)`` from the header; DataError naming the file if it is unusable."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises its own types (and FileNotFoundError-like RuntimeErrors)
        reason = "no such file" if not Path(path).exists() else f"unreadable or corrupt audio file ({e})"
        raise DataError(f"{path}: {reason}") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise DataError(f"{path}: audio file has 0 samples")
    return int(info.samplerate), int(info.frames), int(info.channels)


def load_audio(path, sample_rate=SAMPLE_RATE):
    """Decode ``path`` into a mono float32 tensor at ``sample_rate``: channels averaged, then resampled.

    Returns ``(wav [samples], original sample rate, original channel count)``.
    """
    import torchaudio.functional as AF

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{path}: unreadable or corrupt audio file ({e})") from e
    if data.shape[0] == 0:
        raise DataError(f"{path}: audio file has 0 samples")
    channels = data.shape[1]
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    if not torch.isfinite(wav).all():
        raise DataError(f"{path}: audio holds NaN/inf samples")
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav, int(sr), int(channels)


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
class FoldedEncoder(torch.nn.Module):
    """A plain ``WavLMModel`` (e.g. a folded export) with the recipes' encoder contract (hidden states, frame mask)."""

    def __init__(self, model, normalize_wav=True):
        super().__init__()
        self.model = model
        self.normalize_wav = normalize_wav

    def forward(self, wavs, wav_lens):
        return run_wavlm(self.model, wavs, wav_lens, self.normalize_wav)


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

    def predict(self, paths, batch_seconds=60.0, progress=True):
        """Predict every file; returns one dict per path, in input order.

        Keys: ``file``, ``duration`` (s, at 16 kHz), ``sample_rate`` / ``channels`` (of the file), ``emotion``
        (argmax class), ``probs`` ({class: probability}, the recipe's classes), ``transcript`` (models with a CTC head),
        ``error`` (None, or why the file was skipped: then the prediction keys are None).
        """
        from tqdm import tqdm

        paths = [str(p) for p in paths]
        results = [None] * len(paths)
        todo, durations = [], []
        for i, p in enumerate(paths):
            try:
                sr, frames, _ = probe_audio(p)
            except DataError as e:
                results[i] = self._failure(p, e)
                continue
            todo.append(i)
            durations.append(frames / sr)
        batches = duration_batches(durations, batch_seconds) if todo else []
        told = False
        with tqdm(total=len(todo), unit="file", desc="inference", disable=not progress or len(batches) < 2,
                  leave=False) as bar:
            for batch in batches:
                items = []
                for j in batch:
                    i = todo[j]
                    try:
                        wav, sr, ch = load_audio(paths[i])
                        if wav.numel() < self.min_samples:
                            raise DataError(f"{paths[i]}: too short ({wav.numel()} samples at 16 kHz; the model "
                                            f"needs at least {self.min_samples})")
                    except DataError as e:
                        results[i] = self._failure(paths[i], e)
                        continue
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
def best_checkpoint(save_folder, key="loss"):
    """The ``CKPT+*`` folder with the lowest ``key`` in its ``CKPT.yaml`` meta (ties: the most recent)."""
    import yaml

    save_folder = Path(save_folder)
    found = []
    for meta_file in sorted(save_folder.glob("CKPT+*/CKPT.yaml")):
        try:
            meta = yaml.safe_load(meta_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{meta_file}: not valid YAML ({e})") from e
        if isinstance(meta.get(key), (int, float)):
            found.append((float(meta[key]), -float(meta.get("unixtime", 0)), meta_file.parent))
    if not found:
        raise DataError(f"{save_folder}: no checkpoint (CKPT+*/CKPT.yaml) with a '{key}' value; "
                        "was the experiment trained for at least one epoch?")
    return min(found, key=lambda t: t[:2])[2]


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


def _load_state(module, ckpt_file):
    try:
        state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DataError(f"{ckpt_file}: checkpoint file missing") from e
    except Exception as e:
        raise DataError(f"{ckpt_file}: cannot read checkpoint ({e})") from e
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{ckpt_file}: does not fit the model built from hyperparams.yaml ({e})") from e


def load_experiment(exp_dir, device="cpu", overrides=None, fold=False):
    """Rebuild a recipe's model from ``<exp_dir>/hyperparams.yaml`` and load its best (lowest-loss) checkpoint.

    ``overrides``: nested hyperpyyaml overrides applied to the saved hparams, e.g.
    ``{"wavlm": {"source": "/models/wavlm-large"}}`` when the experiment was moved (references are already
    resolved in the saved file, so override the module's own key). ``fold``: for AdaLTM, bake λ into one plain
    WavLM once (faster; otherwise W_base + Σ λ ΔW is rebuilt at every batch, exactly as in training).
    """
    import ruamel.yaml
    from hyperpyyaml import load_hyperpyyaml

    from lobes.adaltm.merged_wavlm import MergedWavLM

    exp_dir = Path(exp_dir).resolve()
    hp_file = exp_dir / "hyperparams.yaml"
    text = hp_file.read_text()
    try:
        preview = ruamel.yaml.YAML().load(text) or {}
    except Exception as e:
        raise DataError(f"{hp_file}: not valid YAML ({e})") from e
    root = training_root(exp_dir, preview.get("output_folder"))
    merged = {}
    for key, value in preview.items():  # a !PLACEHOLDER left in the file must not stop inference
        if getattr(getattr(value, "tag", None), "value", None) == "!PLACEHOLDER":
            merged[key] = str(exp_dir)
    if "checkpointer" in preview:  # it creates its folder when built: point it at this experiment's save/
        merged["checkpointer"] = {"checkpoints_dir": str(exp_dir / "save")}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    try:
        with _working_dir(root), _kept_rng():
            hparams = load_hyperpyyaml(text, merged)
    except DataError as e:
        raise DataError(f"{hp_file}: cannot rebuild the model ({e}); relative paths are read from {root}; "
                        "pass overrides for moved files") from e
    except Exception as e:
        raise DataError(f"{hp_file}: cannot rebuild the model ({type(e).__name__}: {e}); relative paths are "
                        f"read from {root}") from e

    modules = hparams.get("modules") or {}
    if "wavlm" not in modules:
        raise DataError(f"{hp_file}: no 'wavlm' module in 'modules'")
    checkpointer = hparams.get("checkpointer")
    if checkpointer is None:
        raise DataError(f"{hp_file}: no checkpointer; cannot tell which weights were trained")
    ckpt = best_checkpoint(exp_dir / "save")
    for name, obj in checkpointer.recoverables.items():
        if isinstance(obj, torch.nn.Module):  # the epoch counter and optimizers are not needed
            _load_state(obj, ckpt / f"{name}.ckpt")

    encoder = modules["wavlm"]
    kind = "AdaLTM" if isinstance(encoder, MergedWavLM) else ("MTL" if "ctc_head" in modules and "ser_head" in
                                                              modules else ("ASR-CTC" if "ctc_head" in modules
                                                                            else "SER"))
    if fold and isinstance(encoder, MergedWavLM):
        from lobes.adaltm.fold_export import fold_to_wavlm

        encoder = FoldedEncoder(fold_to_wavlm(encoder), encoder.normalize_wav)
    logger.info("loaded %s experiment %s (checkpoint %s)", kind, exp_dir, ckpt.name)
    classes = hparams.get("emotion_classes") if "ser_head" in modules else None
    if "ser_head" in modules and not classes:
        raise DataError(f"{hp_file}: has an emotion head (ser_head) but no 'emotion_classes'")
    return Recognizer(encoder, modules.get("weighted_sum"), modules.get("ser_head"), modules.get("ctc_head"),
                      classes=classes, device=device, description=f"{kind} experiment {exp_dir} ({ckpt.name})")


def load_folded_export(export_dir, device="cpu"):
    """A folded AdaLTM export: plain HF WavLM + α + emotion head (sizes read from the saved weights)."""
    from safetensors import safe_open
    from transformers import WavLMModel

    from lobes.adaltm.fold_export import load_downstream
    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    export_dir = Path(export_dir).resolve()
    cfg_file = export_dir / "downstream.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{cfg_file}: cannot read the downstream configuration ({e})") from e
    try:
        model = WavLMModel.from_pretrained(str(export_dir))
    except Exception as e:
        raise DataError(f"{export_dir}: cannot load the folded WavLM ({e})") from e
    try:
        with safe_open(str(export_dir / "downstream.safetensors"), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise DataError(f"{export_dir / 'downstream.safetensors'}: cannot read ({e})") from e
    need = ("weighted_sum.weights", "ser_head.frame_proj.0.weight", "ser_head.classifier.0.weight",
            "ser_head.classifier.3.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise DataError(f"{export_dir / 'downstream.safetensors'}: lacks {missing}")
    num_layers = model.config.num_hidden_layers
    n_weights = shapes["weighted_sum.weights"][0]
    include_cnn = bool(cfg.get("include_cnn", n_weights == num_layers + 1))
    hidden = shapes["ser_head.frame_proj.0.weight"][0]
    pooled = shapes["ser_head.classifier.0.weight"][1]
    pooling = cfg.get("pooling", "mean_std" if pooled == 2 * hidden else "mean")
    num_proj = len({k.split(".")[2] for k in shapes if k.startswith("ser_head.frame_proj.")})
    classes = cfg.get("classes")
    if not classes:
        raise DataError(f"{cfg_file}: lacks 'classes' (the emotion class names, in head output order)")
    weighted_sum = WeightedLayerSum(num_layers, include_cnn=include_cnn, layer_norm=bool(cfg.get("layer_norm", False)))
    ser_head = SERHead(model.config.hidden_size, hidden, num_classes=shapes["ser_head.classifier.3.weight"][0],
                       pooling=pooling, num_proj_layers=num_proj, head_type=cfg.get("head_type", "frame_mlp"))
    try:
        load_downstream(export_dir, {"weighted_sum": weighted_sum, "ser_head": ser_head})
    except RuntimeError as e:
        raise DataError(f"{export_dir / 'downstream.safetensors'}: does not fit {cfg_file} ({e})") from e
    encoder = FoldedEncoder(model, normalize_wav=bool(cfg.get("normalize_wav", True)))
    logger.info("loaded folded export %s", export_dir)
    return Recognizer(encoder, weighted_sum, ser_head, classes=classes, device=device,
                      description=f"folded AdaLTM export {export_dir}")


def is_folded_export(path):
    path = Path(path)
    return (path / "config.json").is_file() and (path / "downstream.json").is_file()


def load_model(path, device="cpu", overrides=None, fold=False):
    """A :class:`Recognizer` from an experiment directory or a folded export (see the module docstring).

    A folder holding exactly one experiment one level down (``exp/.../setup4_dual`` with its ``1986/`` seed
    folder) is accepted as well.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such model directory")
    if is_folded_export(path):
        return load_folded_export(path, device)
    if (path / "hyperparams.yaml").is_file():
        return load_experiment(path, device, overrides, fold)
    below = sorted(p.parent for p in path.glob("*/hyperparams.yaml"))
    if len(below) == 1:
        return load_experiment(below[0], device, overrides, fold)
    if len(below) > 1:
        raise DataError(f"{path}: holds several experiments ({', '.join(p.name for p in below)}); name one")
    raise DataError(f"{path}: neither an experiment directory (hyperparams.yaml + save/) nor a folded export "
                    "(config.json + downstream.json)")
