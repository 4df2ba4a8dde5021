"""In-RAM feature cache under DDP with a reshuffled training set: what building the replicated train split costs
if each rank builds all of it vs half of it + an all-gather (lobes/adaltm/feature_cache.py, ``gather_entries``).

    .venv/bin/python benchmarks/bench_cache_ddp.py [--entries 512] [--epoch-n 2048] [--out benchmarks/logs/cache_ddp.json]

1. FLOPs of one WavLM-Large forward of a 5.6 s utterance (the paper's mean; meta device, torch.utils.flop_counter):
   the build's compute, counted, not timed (no GPU here).
2. ``gather_entries`` over 2 gloo processes on this CPU: pooled WavLM-Large entries ([25, 1024] fp32), seconds
   per GB received.
3. One epoch of α + ``pooled_linear`` head training from a pooled in-RAM cache (SpeechBrain loader, micro-batch
   16, AdamW, 1 thread): seconds per utterance.
"""
import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

L1, D = 25, 1024  # WavLM-Large: 24 layers + CNN output, hidden 1024


def wavlm_large_flops(seconds):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WavLMModel

    from tools import plan_memory as pm

    with torch.device("meta"):
        model = WavLMModel(pm.wavlm_config("large")).eval()
        wav = torch.empty(1, int(seconds * 16000))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(wav, output_hidden_states=True)
    return counter.get_total_flops()


def _gather_worker(rank, world, port, n, out):
    import torch

    from lobes.adaltm.feature_cache import gather_entries

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    local = {f"r{rank}_{i:06d}": torch.randn(L1, D) for i in range(n)}
    torch.distributed.barrier()
    t0 = time.perf_counter()
    got = gather_entries(local, 256 * 2 ** 20)
    dt = time.perf_counter() - t0
    assert len(got) == world * n
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": dt, "bytes_received": world * n * L1 * D * 4}))
    torch.distributed.destroy_process_group()


def gather_rate(n):
    import tempfile

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gather.json"
        torch.multiprocessing.spawn(_gather_worker, args=(2, port, n, str(out)), nprocs=2, join=True)
        return json.loads(out.read_text())


def epoch_per_utterance(n, micro=16):
    import speechbrain as sb
    import torch
    from speechbrain.dataio.dataset import DynamicItemDataset

    from lobes.adaltm.feature_cache import FeatureCache, cached_hidden
    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cache = FeatureCache(feats={f"u{i:06d}": torch.randn(L1, D) for i in range(n)})
    ds = DynamicItemDataset({u: {"duration": 5.6} for u in sorted(cache.ids())})
    ds.add_dynamic_item(cache.pipeline())
    ds.set_output_keys(["id", "feats"])
    ws, head = WeightedLayerSum(L1 - 1, include_cnn=True), SERHead(D, 256, num_classes=8, head_type="pooled_linear")
    opt = torch.optim.AdamW(list(ws.parameters()) + list(head.parameters()), lr=1e-4)
    loader = sb.dataio.dataloader.make_dataloader(ds, batch_size=micro, shuffle=True)
    t0 = time.perf_counter()
    for batch in loader:
        hidden, mask = cached_hidden(*batch.feats)
        loss = head(ws(hidden), mask).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=512, help="pooled entries per rank in the all-gather")
    p.add_argument("--epoch-n", type=int, default=2048, help="utterances of the cached epoch")
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "cache_ddp.json"))
    a = p.parse_args(argv)
    flops = wavlm_large_flops(5.6)
    gather = gather_rate(a.entries)
    per_utt = epoch_per_utterance(a.epoch_n)
    train, world = 89752, 2
    res = {"wavlm_large_tflop_per_5.6s": flops / 1e12, "build_pflop_train": flops * train / 1e15,
           "gather": gather, "gather_s_per_gb": gather["seconds"] / (gather["bytes_received"] / 1e9),
           "epoch_s_per_utterance_cpu": per_utt, "epoch_s_train_per_rank_cpu": per_utt * train / world}
    res["gather_s_train"] = res["gather_s_per_gb"] * train * L1 * D * 4 / 1e9
    for k, v in res.items():
        print(f"{k}: {v}")
    C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "results": res})


if __name__ == "__main__":
    main()
