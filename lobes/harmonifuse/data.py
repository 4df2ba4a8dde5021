"""HarmoniFuse data: settings check, the per-task datasets from prepared manifests and their loaders.

Datasets are keyed by :class:`lobes.harmonifuse.task_split.TaskSplit`: ``asr`` / ``ser`` (+ ``ser:<name>`` per
``ser_extra_sources`` entry) for training, ``asr:<split>`` and ``ser:valid`` / ``ser:test`` for evaluation.
Training interleaves whole batches of one source (``lobes.harmonifuse.interleave``); ``<task>_batch_size`` (or
``max_batch_length_<task>``) is the global batch of one optimizer step, and under DDP every rank runs a
contiguous share of each. Validation and test run every batch of every set once, set after set,
and ``ToolkitBrain.make_dataloader`` shards them. The batches of one set come from the shared sampler builder
``lobes.dataio.loader_kwargs`` (seeded with the recipe seed, the same on every rank).
"""
import json
import logging
from collections import Counter
from pathlib import Path

import speechbrain as sb
from speechbrain.dataio.batch import PaddedBatch

from lobes import distributed as D
from lobes.dataio import asr_datasets, loader_kwargs, ser_datasets
from lobes.errors import DataError
from lobes.harmonifuse.interleave import SequentialTaskBatchSampler, TaskTaggedConcat, make_interleaved_dataloader
from lobes.harmonifuse.task_split import TaskSplit
from lobes.io_utils import atomic_write

logger = logging.getLogger(__name__)


def check_hparams(hparams):
    """Refuse task settings that cannot run, before any work."""
    tasks = hparams["train_tasks"]
    if not tasks or set(tasks) - {"asr", "ser"} or len(set(tasks)) != len(tasks):
        raise DataError(f"train_tasks must be a non-empty subset of [asr, ser], got {tasks}")
    missing = [t for t in tasks if not hparams["interleave_ratio"].get(t)]
    if missing:
        raise DataError(f"interleave_ratio {hparams['interleave_ratio']} gives no batches to trained task(s) {missing}")
    if "asr" in tasks and not hparams["libri_test_splits"]:
        raise DataError("libri_test_splits is empty: ASR needs at least one test split (e.g. [test-clean])")
    if hparams["ser_corpus"] not in ("msp_podcast", "iemocap"):
        raise DataError(f"ser_corpus must be 'msp_podcast' or 'iemocap', got '{hparams['ser_corpus']}'")
    if hparams["ser_corpus"] == "iemocap" and "ser" in tasks and int(hparams["iemocap_fold"]) not in range(1, 6):
        raise DataError(f"iemocap_fold must be a session number 1..5, got {hparams['iemocap_fold']}")
    extra = hparams["ser_extra_sources"] or {}
    if extra and "ser" not in tasks:
        raise DataError(f"ser_extra_sources {sorted(extra)} need 'ser' in train_tasks, got {tasks}")
    missing = [str(TaskSplit("ser", n)) for n in extra if not hparams["interleave_ratio"].get(str(TaskSplit("ser", n)))]
    if missing:
        raise DataError(f"interleave_ratio {hparams['interleave_ratio']} gives no batches to the extra SER "
                        f"source(s) {missing} (add e.g. '{missing[0]}': 1)")


def train_sources(hparams):
    """Interleaved training sources: the trained tasks, then one ``ser:<name>`` per ``ser_extra_sources`` entry."""
    return ([TaskSplit(t) for t in hparams["train_tasks"]]
            + [TaskSplit("ser", n) for n in (hparams["ser_extra_sources"] or {})])


def needs_unused_parameter_search(hparams):
    """DDP's ``find_unused_parameters``: only the classify head is idle on some batches (those of ASR)."""
    return hparams["ser_mode"] == "classify" and "asr" in hparams["train_tasks"]


def ser_prep_folder(hparams):
    """Where the SER train/valid/test manifests are: MSP-Podcast's, or the IEMOCAP fold's."""
    if hparams["ser_corpus"] == "iemocap":
        return Path(hparams["iemocap_prep_folder"]) / f"fold{hparams['iemocap_fold']}"
    return Path(hparams["msp_prep_folder"])


def libri_train_manifest(hparams):
    """One manifest for the ASR training splits (several splits are merged into one file, once)."""
    folder = Path(hparams["libri_prep_folder"])
    splits = list(hparams["libri_train_splits"])
    if len(splits) == 1:
        return str(folder / f"{splits[0]}.json")
    merged = folder / ("train_" + "+".join(splits) + ".json")
    if sb.utils.distributed.if_main_process():
        data = {}
        for s in splits:
            path = folder / f"{s}.json"
            try:
                part = json.loads(path.read_text())
            except FileNotFoundError:
                raise DataError(f"manifest '{path}' does not exist: run data preparation (stage 0) first") from None
            dup = set(part) & set(data)
            if dup:
                raise DataError(f"{path}: utterance ids also in another training split, e.g. {sorted(dup)[:3]}")
            data.update(part)
        with atomic_write(merged) as f:
            json.dump(data, f, indent=2)
    sb.utils.distributed.ddp_barrier()
    return str(merged)


def asr_sets(hparams):
    """{"train" | "valid" | "test": {TaskSplit: dataset}} of LibriSpeech (test splits that were prepared)."""
    lp = Path(hparams["libri_prep_folder"])
    man = {"train": libri_train_manifest(hparams), "valid": str(lp / f"{hparams['libri_valid_split']}.json")}
    first = lp / f"{hparams['libri_test_splits'][0]}.json"
    if not first.exists():  # later splits (test-other) are optional, the first one is the reported WER
        raise DataError(f"manifest '{first}' does not exist: run data preparation (stage 0) first")
    tests = [s for s in hparams["libri_test_splits"] if (lp / f"{s}.json").exists()]
    man.update({f"test:{s}": str(lp / f"{s}.json") for s in tests})
    ds = asr_datasets(man)
    return {"train": {TaskSplit("asr"): ds["train"]},
            "valid": {TaskSplit("asr", hparams["libri_valid_split"]): ds["valid"]},
            "test": {TaskSplit("asr", s): ds[f"test:{s}"] for s in tests}}


def ser_sets(hparams):
    """{"train" | "valid" | "test": {TaskSplit: dataset}} of the SER corpus, plus the extra training sources."""
    classes = hparams["emotion_classes"]
    if hparams["ser_corpus"] == "iemocap":  # the head's classes must be the prepared ones, in their order
        listed = Path(hparams["iemocap_prep_folder"]) / "classes.txt"
        prepared = listed.read_text().split() if listed.is_file() else None
        if prepared != list(classes):
            raise DataError(f"emotion_classes {list(classes)} differ from the prepared "
                            f"IEMOCAP classes {prepared} ({listed})")
    mp = ser_prep_folder(hparams)
    ds = ser_datasets({s: str(mp / f"{s}.json") for s in ("train", "valid", "test")}, classes)
    out = {"train": {TaskSplit("ser"): ds["train"]}, "valid": {TaskSplit("ser", "valid"): ds["valid"]},
           "test": {TaskSplit("ser", "test"): ds["test"]}}
    # extra SER training sources (e.g. a tools.pseudo_label manifest): interleaved as SER batches of their own
    for name, manifest in (hparams["ser_extra_sources"] or {}).items():
        if not Path(manifest).is_file():
            raise DataError(f"ser_extra_sources.{name}: manifest '{manifest}' does not exist")
        ds = ser_datasets({"train": str(manifest)}, classes)["train"]
        out["train"][TaskSplit("ser", name)] = confident_subset(ds, hparams["pseudo_label_threshold"], name)
    return out


def confident_subset(dataset, threshold, name):
    """The utterances of an extra (pseudo-labelled) SER source whose top soft-label probability is at least
    ``threshold`` (``pseudo_label_threshold``); the count left out is logged. They train on the soft labels."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise DataError(f"pseudo_label_threshold must be a probability in [0, 1], got {threshold}")
    kept = dataset.filtered_sorted(key_test={"emo_soft": lambda soft: max(soft) >= float(threshold)})
    dropped = len(dataset) - len(kept)
    logger.info("ser_extra_sources.%s: %d of %d utterances below pseudo_label_threshold %s left out",
                name, dropped, len(dataset), threshold)
    if not len(kept):
        raise DataError(f"ser_extra_sources.{name}: every one of its {len(dataset)} utterances is below "
                        f"pseudo_label_threshold {threshold}")
    return kept


def build_datasets(hparams):
    """{"train" | "valid" | "test": {TaskSplit: dataset}} of the trained tasks, ASR first."""
    out = {"train": {}, "valid": {}, "test": {}}
    for task, sets in (("asr", asr_sets), ("ser", ser_sets)):
        if task in hparams["train_tasks"]:
            for stage, by_tag in sets(hparams).items():
                out[stage].update(by_tag)
    return out


def task_batch_sampler(hparams, dataset, task, train):
    """Batches of one task's dataset as a single process runs them: ``<task>_batch_size`` utterances or, with
    dynamic batching, ``max_batch_length_<task>`` seconds; shuffled with the recipe seed when training (the same
    batches on every DDP rank; make_loaders shards)."""
    size = hparams[f"max_batch_length_{task}"] if hparams["dynamic_batching"] else hparams[f"{task}_batch_size"]
    return loader_kwargs(hparams, dataset, train, micro=size, seed=hparams["seed"])["batch_sampler"]


def evaluation_loader_kwargs(hparams, sets):
    """(the task-tagged concatenation of ``sets``, loader kwargs running every batch of every set once)."""
    concat = TaskTaggedConcat(sets)
    dup = sorted(i for i, n in Counter(concat.data_ids).items() if n > 1)
    if dup:  # outputs are gathered across ranks by utterance id
        raise DataError(f"evaluation sets {[str(t) for t in sets]} share utterance ids, e.g. {dup[:3]}")
    sampler = SequentialTaskBatchSampler(
        {tag: task_batch_sampler(hparams, ds, tag.task, False) for tag, ds in sets.items()}, concat.offsets)
    return concat, {"batch_sampler": sampler, "collate_fn": PaddedBatch, "num_workers": hparams["num_workers"]}


def make_loaders(hparams, datasets):
    """-> training DataLoader (interleaved; under DDP this rank's contiguous share of every global batch), and
    for validation and test a (dataset, loader kwargs) pair that ``Brain.fit`` / ``evaluate`` turn into this
    rank's sharded loader."""
    sources = train_sources(hparams)
    length = hparams["interleave_length"]
    if D.world_size() > 1:
        unit = "s of audio" if hparams["dynamic_batching"] else "utterances"
        key = "max_batch_length_{}" if hparams["dynamic_batching"] else "{}_batch_size"
        logger.info("global batches (per optimizer step) over %d ranks, each rank a contiguous share: %s",
                    D.world_size(), ", ".join(f"{t} {hparams[key.format(t)]} {unit}" for t in hparams["train_tasks"]))
    train = make_interleaved_dataloader(
        datasets["train"],
        {t: task_batch_sampler(hparams, datasets["train"][t], t.task, True) for t in sources},
        ratio={t: hparams["interleave_ratio"][str(t)] for t in sources},
        length=int(length) if str(length).isdigit() else length, order=hparams["interleave_order"],
        seed=hparams["seed"], num_workers=hparams["num_workers"], rank=D.rank(), world=D.world_size())
    return (train, evaluation_loader_kwargs(hparams, datasets["valid"]),
            evaluation_loader_kwargs(hparams, datasets["test"]))
