"""Batch interleaving of ASR and SER: exact ratio, one task per batch, determinism, DDP shards."""
from collections import Counter

import pytest
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from lobes.errors import DataError
from lobes.harmonifuse.interleave import (InterleavedBatchSampler, InterleavedLoader, TaskTaggedConcat, batch_task,
                              interleave_schedule, make_interleaved_dataloader, num_rounds, parse_ratio)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles 0..n-1 with a generator seeded by the epoch, and records every set_epoch call."""

    def __init__(self, n):
        self.n, self.epoch, self.calls = n, 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.calls.append(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def make_dataset(task, n):
    """A SpeechBrain DynamicItemDataset whose ids name their task; 'sig' has 1-3 samples (padding)."""
    ds = DynamicItemDataset({f"{task}_{i}": {"x": float(i), "n": i % 3 + 1} for i in range(n)})
    ds.add_dynamic_item(lambda x, n: torch.full((n,), x), takes=["x", "n"], provides="sig")
    ds.set_output_keys(["id", "sig"])
    return ds


def batches(n_items, batch_size, sampler=None):
    return BatchSampler(sampler or EpochSampler(n_items), batch_size, drop_last=False)


def test_parse_ratio_and_rounds():
    assert parse_ratio("2:1", ["asr", "ser"]) == {"asr": 2, "ser": 1}
    assert parse_ratio((1, 3), ["asr", "ser"]) == {"asr": 1, "ser": 3}
    assert parse_ratio({"ser": 2}, ["asr", "ser"]) == {"asr": 0, "ser": 2}
    with pytest.raises(DataError, match="unknown task"):
        parse_ratio({"sv": 1}, ["asr", "ser"])
    counts, ratio = {"asr": 10, "ser": 3}, {"asr": 2, "ser": 1}
    assert num_rounds(counts, ratio, "max") == 5   # max(ceil(10/2), ceil(3/1))
    assert num_rounds(counts, ratio, "min") == 3   # min(10//2, 3//1)
    assert num_rounds(counts, ratio, 12) == 4
    with pytest.raises(DataError, match="not a multiple"):
        num_rounds(counts, ratio, 10)
    with pytest.raises(DataError, match="no batches"):
        num_rounds({"asr": 0, "ser": 3}, ratio, "max")
    assert interleave_schedule(counts, ratio, "min") == ["asr", "asr", "ser"] * 3


@pytest.mark.parametrize("length,n_asr,n_ser", [("max", 10, 5), ("min", 6, 3), (12, 8, 4)])
def test_dataloader_exact_ratio_and_no_mixing(length, n_asr, n_ser):
    # asr: 19 items in batches of 2 -> 10 batches; ser: 7 items in batches of 3 -> 3 batches
    datasets = {"asr": make_dataset("asr", 19), "ser": make_dataset("ser", 7)}
    samplers = {"asr": batches(19, 2), "ser": batches(7, 3)}
    loader = make_interleaved_dataloader(datasets, samplers, ratio={"asr": 2, "ser": 1}, length=length,
                                         order="shuffle", seed=3)
    loader.batch_sampler.set_epoch(0)
    assert len(loader) == n_asr + n_ser
    counts, seen = Counter(), Counter()
    for batch in loader:
        task = batch_task(batch)
        counts[task] += 1
        assert all(uid.startswith(task + "_") for uid in batch.id)  # every item from that task's corpus
        assert batch.sig.data.shape[0] == len(batch.id)
        seen.update(batch.id)
    assert counts == {"asr": n_asr, "ser": n_ser}
    if length == "max":
        # every ASR item exactly once; SER cycled: 5 batches = a full pass (7 items) + 2 batches of a 2nd pass
        assert all(seen[f"asr_{i}"] == 1 for i in range(19))
        assert sum(v for k, v in seen.items() if k.startswith("ser_")) == 7 + 6
        assert all(seen[f"ser_{i}"] >= 1 for i in range(7))


def test_round_robin_order_and_pass_epochs():
    asr, ser = EpochSampler(4), EpochSampler(3)
    s = InterleavedBatchSampler({"asr": BatchSampler(asr, 1, False), "ser": BatchSampler(ser, 2, False)},
                                offsets={"asr": 0, "ser": 100}, ratio="1:2")
    # asr 4 batches, ser 2 batches; R = max(4, 1) = 4 rounds of A S S; ser needs 8 batches = 4 passes
    assert s.passes == {"asr": 1, "ser": 4}
    s.set_epoch(1)
    out = list(s)
    assert s.last_schedule == ["asr", "ser", "ser"] * 4
    assert all((b[0] < 100) == (t == "asr") for b, t in zip(out, s.last_schedule))
    # epoch 1: ser's passes k=0..3 use sampler epochs 1*4+k, then it is reset to its first pass (4)
    assert ser.calls == [4, 5, 6, 7, 4] and asr.calls == [1]
    assert sorted(i for b in out if b[0] < 100 for i in b) == [0, 1, 2, 3]  # one pass over asr
    assert sorted(i for b in out[1:3] for i in b) == [100, 101, 102]  # first ser pass: both batches


def test_deterministic_per_seed_and_epoch():
    def run(seed, epoch):
        d = {"asr": make_dataset("asr", 9), "ser": make_dataset("ser", 5)}
        loader = make_interleaved_dataloader(d, {"asr": batches(9, 2), "ser": batches(5, 2)}, ratio=(1, 1),
                                             order="shuffle", seed=seed)
        loader.batch_sampler.set_epoch(epoch)
        return [tuple(b.id) for b in loader]

    a = run(0, 0)
    assert a == run(0, 0)
    assert a != run(0, 1) and a != run(1, 0)
    assert len(a) == 10  # max(ceil(5/1), ceil(3/1)) rounds of 1 asr + 1 ser


def test_ddp_ranks_share_schedule_and_split_data():
    per_rank = []
    for rank in range(2):
        samplers = {
            "asr": BatchSampler(DistributedSampler(range(12), num_replicas=2, rank=rank, seed=5), 2, False),
            "ser": BatchSampler(DistributedSampler(range(4), num_replicas=2, rank=rank, seed=5), 1, False),
        }
        s = InterleavedBatchSampler(samplers, {"asr": 0, "ser": 12}, ratio={"asr": 1, "ser": 1},
                                    order="shuffle", seed=7)
        s.set_epoch(2)
        per_rank.append((list(s), s.last_schedule))
    (b0, sched0), (b1, sched1) = per_rank
    assert sched0 == sched1 and len(sched0) == 6  # 3 asr batches per rank, ser (2 per rank) cycled
    asr0 = {i for b in b0 for i in b if i < 12}
    asr1 = {i for b in b1 for i in b if i < 12}
    assert asr0.isdisjoint(asr1) and asr0 | asr1 == set(range(12))


def test_interleaved_loader_over_dataloaders():
    asr = DataLoader(list(range(6)), batch_size=2)        # 3 batches
    ser = DataLoader(list(range(100, 104)), batch_size=2)  # 2 batches
    il = InterleavedLoader({"asr": asr, "ser": ser}, ratio="1:1", length="min")
    items = list(il)
    assert len(il) == 4 and [t for t, _ in items] == ["asr", "ser", "asr", "ser"]
    assert [b.tolist() for _, b in items] == [[0, 1], [100, 101], [2, 3], [102, 103]]
    assert batch_task(items[1]) == "ser"


def test_tagged_concat_and_batch_task_errors():
    c = TaskTaggedConcat({"asr": make_dataset("asr", 2), "ser": make_dataset("ser", 3)})
    assert len(c) == 5 and c.offsets == {"asr": 0, "ser": 2}
    assert c[2]["id"] == "ser_0" and c[2]["task"] == "ser" and c[1]["task"] == "asr"
    with pytest.raises(DataError, match="mixes tasks"):
        batch_task({"task": ["asr", "ser"]})
    with pytest.raises(DataError, match="has no batches|no batches"):
        InterleavedLoader({"asr": DataLoader([]), "ser": DataLoader([1])})


def test_speechbrain_dynamic_batching_under_ddp():
    """Per-rank DistributedSamplerWrapper(DynamicBatchSampler): same schedule on both ranks, disjoint ASR data."""
    from speechbrain.dataio.sampler import DistributedSamplerWrapper, DynamicBatchSampler

    def dur_dataset(task, n):
        d = DynamicItemDataset({f"{task}_{i}": {"duration": 1.0 + i % 4} for i in range(n)})
        d.add_dynamic_item(lambda duration: torch.zeros(int(duration)), takes=["duration"], provides="sig")
        d.set_output_keys(["id", "sig"])
        return d

    runs = []
    for rank in range(2):
        d = {"asr": dur_dataset("asr", 30), "ser": dur_dataset("ser", 10)}
        bs = {t: DistributedSamplerWrapper(
            DynamicBatchSampler(d[t], max_batch_length=6, num_buckets=2, length_func=lambda x: x["duration"],
                                shuffle=True, batch_ordering="random"), num_replicas=2, rank=rank)
              for t in d}
        loader = make_interleaved_dataloader(d, bs, ratio="1:1", order="shuffle")
        loader.batch_sampler.set_epoch(3)
        runs.append([(batch_task(b), list(b.id)) for b in loader])
        assert len(runs[-1]) == len(loader)
        assert Counter(t for t, _ in runs[-1]) == {"asr": len(loader) // 2, "ser": len(loader) // 2}
        assert all(i.startswith(t + "_") for t, ids in runs[-1] for i in ids)
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    asr_ids = [{i for t, ids in run if t == "asr" for i in ids} for run in runs]
    assert asr_ids[0].isdisjoint(asr_ids[1]) and len(asr_ids[0] | asr_ids[1]) == 30
