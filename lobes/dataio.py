"""Data pipelines shared by every recipe: manifests -> SpeechBrain datasets -> (dynamic) batches.

Manifest keys are documented in docs/DESIGN.md. Pipelines:
- ``sig``                : waveform (mono, 16 kHz, checked by ``lobes.audio.read_audio``);
- ``emo_idx``, ``soft_label``: hard class index and soft label vector (AdaLTM's class-balanced soft CE), over
  the recipe's class list (``emotion_classes`` in its YAML; nothing here knows a corpus's classes);
- ``wrd``, ``tokens``    : normalised transcript and its CTC character indices.

Dynamic batching groups utterances of similar duration into per-GPU batches of at most ``micro_batch_length``
seconds (``max_batch_length`` is the global seconds per optimizer step; ``lobes.distributed``) (SpeechBrain's
``DynamicBatchSampler``), so long podcast turns do not run out of memory and little of a batch
is padding; see ``padding_share`` to measure it.

SpeechBrain-format manifests (``{utt: {"wav", "length", "emo"}}``, as SpeechBrain's IEMOCAP recipe writes them)
are read as they are (``from_speechbrain``): an entry without ``duration`` takes it from ``length`` (seconds)
or, lacking that, from the wav header; an entry with ``emo`` but no ``emo_soft`` gets the one-hot of its class,
its ``emo`` first mapped by the recipe's ``label_map`` (e.g. SpeechBrain's short labels to MSP-Podcast names,
``SPEECHBRAIN_TO_MSP``); an entry without ``spk_id`` is its own speaker (its utterance id); a ``{data_root}``
in ``wav`` is replaced by ``data_root`` (SpeechBrain's ``replacements``). The number of entries so completed is
logged per manifest.
"""
import json
import logging
import math
from collections import Counter

import speechbrain as sb
import torch
from speechbrain.dataio.sampler import DynamicBatchSampler, ReproducibleRandomSampler
from torch.utils.data import BatchSampler, SequentialSampler

from lobes import ctc_text
from lobes.audio import check_audio, read_audio
from lobes.distributed import micro_batch
from lobes.errors import DataError

logger = logging.getLogger(__name__)

# SpeechBrain's IEMOCAP labels (its prepare merges exc into hap) -> the MSP-Podcast class names of this toolkit;
# an IEMOCAP recipe needs no map (its classes are these short labels), an MSP-Podcast-named one uses this table
SPEECHBRAIN_TO_MSP = {"neu": "Neutral", "ang": "Anger", "hap": "Happiness", "sad": "Sadness"}


@sb.utils.data_pipeline.takes("wav")
@sb.utils.data_pipeline.provides("sig")
def audio_pipeline(wav):
    return read_audio(wav)


def emotion_pipeline(classes):
    """Pipeline ``emo, emo_soft -> emo_idx, soft_label`` for the class names ``classes`` (index = position)."""
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}

    @sb.utils.data_pipeline.takes("emo", "emo_soft")
    @sb.utils.data_pipeline.provides("emo_idx", "soft_label")
    def pipeline(emo, emo_soft):
        if emo not in index:
            raise DataError(f"unknown emotion class '{emo}' (expected one of {classes})")
        yield torch.tensor([index[emo]], dtype=torch.long)  # 1-D: PaddedBatch cannot pad 0-d tensors
        yield torch.tensor(emo_soft, dtype=torch.float)

    pipeline.classes = classes
    return pipeline


@sb.utils.data_pipeline.takes("wrd")
@sb.utils.data_pipeline.provides("wrd", "tokens")
def ctc_text_pipeline(wrd):
    yield wrd
    yield ctc_text.encode(wrd)


_CTC_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")


def _bad_value(entry, required, ctc, classes):
    """Why a manifest entry's value cannot be used ('' when fine). Checked up front, so that bad labels fail
    before training with the manifest and utterance named, not mid-epoch inside a pipeline or as a NaN loss."""
    if "duration" in required:
        d = entry["duration"]
        if not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            return f"duration {d!r} is not a positive number of seconds"
    if "emo" in required and entry["emo"] not in classes:
        return f"unknown emotion class {entry['emo']!r} (expected one of {list(classes)})"
    if "emo_soft" in required:
        soft = entry["emo_soft"]
        if (not isinstance(soft, list) or len(soft) != len(classes)
                or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in soft)
                or abs(sum(soft) - 1.0) > 1e-3):
            return f"emo_soft {soft!r} is not {len(classes)} finite non-negative numbers summing to 1"
    if "wrd" in required:
        wrd = entry["wrd"]
        if not isinstance(wrd, str) or not wrd.strip():
            return "empty transcript ('wrd')"
        if ctc and not set(wrd) <= _CTC_CHARS:
            return (f"transcript holds characters outside the CTC alphabet {sorted(set(wrd) - _CTC_CHARS)} "
                    "(normalise it with lobes.ctc_text.normalize_transcript)")
    return ""


def _complete_entry(path, utt, entry, classes, label_map, data_root):
    """Fill a SpeechBrain-format entry in place (module docstring); True when something was added."""
    added = False
    wav = entry.get("wav")
    if isinstance(wav, str) and "{data_root}" in wav:
        if data_root is None:
            raise DataError(f"manifest '{path}': utterance '{utt}': wav {wav!r} holds SpeechBrain's {{data_root}} "
                            "placeholder but no data_root was given")
        entry["wav"] = wav.replace("{data_root}", str(data_root))
    if "duration" not in entry and ("length" in entry or "wav" in entry):
        entry["duration"] = entry["length"] if "length" in entry else round(check_audio(entry["wav"]), 4)
        added = True
    if classes and "emo" in entry and "emo_soft" not in entry:
        emo = label_map.get(entry["emo"], entry["emo"]) if label_map else entry["emo"]
        if emo not in classes:
            raise DataError(f"manifest '{path}': utterance '{utt}': emotion {entry['emo']!r} is not a class "
                            f"{list(classes)}{f' after label_map {dict(label_map)}' if label_map else ''}")
        entry["emo"], entry["emo_soft"] = emo, [float(c == emo) for c in classes]
        added = True
    if classes and "spk_id" not in entry:
        entry["spk_id"] = utt
        added = True
    return added


def from_speechbrain(path, data, classes=(), label_map=None, data_root=None):
    """``data`` (a manifest's dict) with its SpeechBrain-format entries completed (module docstring)."""
    completed = sum(_complete_entry(path, utt, entry, classes, label_map, data_root)
                    for utt, entry in data.items() if isinstance(entry, dict))
    if completed:
        logger.info("%s: %d of %d entries in SpeechBrain format (no duration / emo_soft / spk_id): durations from "
                    "'length' or the wav, one-hot emo_soft from 'emo'%s, spk_id = utterance id", path, completed,
                    len(data), f" mapped by {dict(label_map)}" if label_map else "")
    return data


def _check_manifest(path, required, ctc=False, classes=(), label_map=None, data_root=None):
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except FileNotFoundError:
        raise DataError(f"manifest '{path}' does not exist: run data preparation (stage 0) first") from None
    except json.JSONDecodeError as e:
        raise DataError(f"manifest '{path}' is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"manifest '{path}' is not a JSON object {{utt_id: entry}}")
    if not data:
        raise DataError(f"manifest '{path}' holds no utterances")
    from_speechbrain(path, data, classes, label_map, data_root)
    for utt, entry in data.items():
        missing = [k for k in required if k not in entry]
        if missing:
            raise DataError(f"manifest '{path}': utterance '{utt}' lacks {missing}")
        why = _bad_value(entry, required, ctc, classes)
        if why:
            raise DataError(f"manifest '{path}': utterance '{utt}': {why}")
    return data


def make_dataset(manifest, pipelines, output_keys, required=("wav", "duration"), sort=None, data_root=None,
                 label_map=None):
    """A ``DynamicItemDataset`` from one manifest (ours or SpeechBrain's: module docstring), validated first so
    errors name the utterance."""
    classes = next((p.classes for p in pipelines if hasattr(p, "classes")), ())
    data = _check_manifest(manifest, required, ctc=ctc_text_pipeline in pipelines, classes=classes,
                           label_map=label_map, data_root=data_root)
    ds = sb.dataio.dataset.DynamicItemDataset(data)
    for p in pipelines:
        ds.add_dynamic_item(p)
    ds.set_output_keys(["id"] + list(output_keys))
    if sort in ("ascending", "descending"):
        ds = ds.filtered_sorted(sort_key="duration", reverse=sort == "descending")
    return ds


def class_counts(manifest, classes, label_map=None, data_root=None):
    """Training-set counts of the hard labels, in ``classes`` order (for the class-balanced loss)."""
    data = _check_manifest(manifest, ("emo",), classes=classes, label_map=label_map, data_root=data_root)
    counts = Counter(entry["emo"] for entry in data.values())
    return [counts.get(e, 0) for e in classes]


def loader_kwargs(hparams, dataset, train, micro=None, seed=None):
    """DataLoader kwargs of one GPU's micro-batches: a ``DynamicBatchSampler`` of at most ``micro_batch_length``
    seconds when ``dynamic_batching`` is on, else ``micro_batch_size`` utterances (``batch_size`` and
    ``max_batch_length`` are global per optimizer step: ``lobes.distributed``). Under DDP, SpeechBrain gives each
    rank its share of the training batches; ``ToolkitBrain.make_dataloader`` shards validation and test.

    ``micro``: the batch (utterances, or seconds with dynamic batching) in place of ``micro_batch(hparams)``.
    ``seed``: a batch sampler seeded with it for fixed-size batches too (shuffled when training, else in
    order), for a recipe that drives its own batches (HarmoniFuse's interleaving); None leaves fixed-size
    shuffling to SpeechBrain's loader and the dynamic sampler at its default seed."""
    micro = micro_batch(hparams) if micro is None else micro
    if hparams["dynamic_batching"]:
        sampler = DynamicBatchSampler(
            dataset,
            max_batch_length=micro,
            num_buckets=hparams["num_buckets"],
            length_func=lambda x: x["duration"],
            shuffle=train,
            batch_ordering="random" if train else "ascending",
            max_batch_ex=hparams["max_batch_ex"],
            **({} if seed is None else {"seed": seed}),
        )
        return {"batch_sampler": sampler, "num_workers": hparams["num_workers"]}
    if seed is not None:
        order = ReproducibleRandomSampler(dataset, seed=seed) if train else SequentialSampler(dataset)
        return {"batch_sampler": BatchSampler(order, micro, drop_last=False), "num_workers": hparams["num_workers"]}
    return {"batch_size": micro, "shuffle": train and hparams["sorting"] == "random",
            "num_workers": hparams["num_workers"]}


def padding_share(durations, batches):
    """Share of padded frames over all batches (each padded to its longest item)."""
    total = padded = 0.0
    for batch in batches:
        lens = [durations[i] for i in batch]
        total += len(lens) * max(lens)
        padded += len(lens) * max(lens) - sum(lens)
    return padded / total if total else 0.0


def ser_datasets(manifests, classes, with_text=False, sort=None, label_map=None, data_root=None):
    """Datasets yielding ``sig, emo_idx, soft_label, spk_id`` (+ ``wrd, tokens`` for multi-task recipes);
    ``classes``: the recipe's emotion class names, the order of ``emo_idx`` and of ``emo_soft``; ``label_map``,
    ``data_root``: for SpeechBrain-format manifests (module docstring)."""
    pipelines = [audio_pipeline, emotion_pipeline(classes)] + ([ctc_text_pipeline] if with_text else [])
    keys = ["sig", "emo_idx", "soft_label", "spk_id"] + (["wrd", "tokens"] if with_text else [])
    required = ("wav", "duration", "emo", "emo_soft") + (("wrd",) if with_text else ())
    return {s: make_dataset(p, pipelines, keys, required, sort=sort if s == "train" else None, data_root=data_root,
                            label_map=label_map)
            for s, p in manifests.items()}


def asr_datasets(manifests, sort=None):
    """Datasets yielding ``sig, wrd, tokens`` from any manifest with ``wav`` and ``wrd``."""
    return {s: make_dataset(p, [audio_pipeline, ctc_text_pipeline], ["sig", "wrd", "tokens"],
                            ("wav", "duration", "wrd"), sort=sort if s == "train" else None)
            for s, p in manifests.items()}
