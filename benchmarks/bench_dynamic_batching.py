"""Padding share of duration-bucketed dynamic batches vs fixed-size random batches (issue 8, target 4).

    .venv/bin/python benchmarks/bench_dynamic_batching.py [--n 2000] [--out benchmarks/logs/dynamic_batching.json]

A podcast-like duration mix: ``--n`` synthetic durations ~ U(2.75 s, 11 s) (MSP-Podcast's segment range),
seeded. Dynamic batches come from ``lobes.dataio.loader_kwargs`` with ``dynamic_batching: True`` (SpeechBrain
``DynamicBatchSampler``, shuffled, random batch order, as in training) over a grid of ``max_batch_length`` /
``num_buckets``; fixed batches are ``batch_size`` consecutive items of a random permutation (``shuffle=True``).
Padding share = padded frames / all frames, each batch padded to its longest item
(``lobes.dataio.padding_share``), averaged over 3 epochs (sampler seeds).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "dynamic_batching.json"))
    a = p.parse_args(argv)

    import logging

    import speechbrain as sb
    import torch

    from lobes.dataio import loader_kwargs, padding_share

    logging.disable(logging.INFO)  # the sampler logs every bucket
    g = torch.Generator().manual_seed(a.seed)
    durations = (2.75 + (11.0 - 2.75) * torch.rand(a.n, generator=g, dtype=torch.float64)).tolist()
    dataset = sb.dataio.dataset.DynamicItemDataset({f"utt{i:05d}": {"duration": d} for i, d in enumerate(durations)})
    total_audio = sum(durations)

    rows = []
    for bs in (4, 8, 16):
        shares, nb = [], 0
        for epoch in range(a.epochs):
            perm = torch.randperm(a.n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
            batches = [perm[i:i + bs] for i in range(0, a.n, bs)]
            shares.append(padding_share(durations, batches))
            nb = len(batches)
        rows.append({"kind": "fixed", "batch_size": bs, "padding_share": sum(shares) / len(shares),
                     "num_batches": nb, "mean_batch_size": a.n / nb,
                     "max_batch_seconds": max(len(b) * max(durations[i] for i in b) for b in batches)})

    for mbl in (30, 60, 120, 200):
        for nbk in (10, 20, 40, 80, 160):
            hp = {"dynamic_batching": True, "max_batch_length": mbl, "num_buckets": nbk, "max_batch_ex": None,
                  "num_workers": 0}
            shares, sizes, maxsec = [], [], 0.0
            for epoch in range(a.epochs):
                sampler = loader_kwargs(hp, dataset, train=True)["batch_sampler"]
                sampler.set_epoch(epoch)
                batches = list(sampler)
                shares.append(padding_share(durations, batches))
                sizes.append(len(batches))
                maxsec = max(maxsec, max(len(b) * max(durations[i] for i in b) for b in batches))
            covered = sorted(i for b in batches for i in b)
            assert covered == list(range(a.n)), "sampler must yield every utterance once per epoch"
            rows.append({"kind": "dynamic", "max_batch_length": mbl, "num_buckets": nbk,
                         "padding_share": sum(shares) / len(shares), "num_batches": sum(sizes) / len(sizes),
                         "mean_batch_size": a.n * len(sizes) / sum(sizes), "max_batch_seconds": maxsec})

    print(f"{a.n} utterances, {total_audio / 3600:.2f} h, durations U(2.75, 11) s")
    print(f"{'kind':8s} {'setting':28s} {'padding':>8s} {'batches':>8s} {'mean size':>9s} {'max padded s':>12s}")
    for r in rows:
        setting = (f"batch_size={r['batch_size']}" if r["kind"] == "fixed"
                   else f"max_len={r['max_batch_length']} buckets={r['num_buckets']}")
        print(f"{r['kind']:8s} {setting:28s} {100 * r['padding_share']:7.1f}% {r['num_batches']:8.0f} "
              f"{r['mean_batch_size']:9.1f} {r['max_batch_seconds']:12.1f}")
    C.save_json(a.out, {"machine": C.machine_info(), "n": a.n, "seed": a.seed, "epochs": a.epochs,
                        "date": time.strftime("%Y-%m-%d"), "rows": rows})


if __name__ == "__main__":
    main()
