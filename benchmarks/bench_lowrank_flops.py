"""FLOPs of one λ-training step vs full fine-tuning (issue 24): a load-independent companion of the timings of
``bench_merge_step.py`` (whose wall and CPU seconds swing by 2x on a shared machine).

    .venv/bin/python benchmarks/bench_lowrank_flops.py [--variants ft_all,materialized,lowrank_r8,...]

Each variant is built exactly as ``bench_merge_step.build`` builds it (WavLM-Base shape, batch 2 x 4 s, α + SER
head + cross-entropy) and one step's forward + backward runs under a dispatch mode that adds up ``torch.utils.flop_counter``'s
per-op formulas (GEMMs, convolutions, attention: the ops that dominate the step; ``FlopCounterMode`` itself cannot
be used: its module tracker trips over WavLM's in-place edits of layer outputs). The optimizer step is not counted (AdamW on
94.4M weights is memory-bound, ~8% of a fine-tuning step in RESULTS §1).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_merge_step as B  # noqa: E402

DEFAULT = "ft_all,materialized,lowrank_r8,lowrank_r32,lowrank_r128,lowrank_e0.9"


class _Flops:
    """A TorchDispatchMode summing flop_counter's formulas over every aten op it sees."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        class Mode(TorchDispatchMode):
            total = 0
            by_op = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                count = flop_registry.get(func._overloadpacket)
                if count is not None:
                    n = count(*args, **kwargs, out_val=out)
                    self.total += n
                    key = str(func._overloadpacket)
                    self.by_op[key] = self.by_op.get(key, 0) + n
                return out

        return Mode()


def child(variant, model_dir, vector_dir):
    import torch

    from lobes.ser_head import SERHead
    from lobes.weighted_sum import WeightedLayerSum

    C.set_threads()
    torch.manual_seed(0)
    enc, _ = B.build(variant, model_dir, vector_dir)
    cfg = enc.model.config
    ws, head = WeightedLayerSum(cfg.num_hidden_layers), SERHead(cfg.hidden_size, 256, num_classes=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    wavs = torch.randn(B.BATCH, int(B.SECONDS * B.SR), generator=g)
    labels = torch.randint(0, 8, (B.BATCH,), generator=g)
    counter = _Flops()
    with counter:
        hidden, mask = enc(wavs, torch.ones(B.BATCH))
        loss = torch.nn.functional.cross_entropy(head(ws(hidden), mask).float(), labels)
        fwd = counter.total
        loss.backward()
    C.emit({"variant": variant, "forward_flops": fwd, "step_flops": counter.total, "by_op": counter.by_op})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir")
    p.add_argument("--vector-dir")
    p.add_argument("--variants", default=DEFAULT)
    p.add_argument("--out", default=str(Path(__file__).parent / "logs" / "lowrank_flops.json"))
    a = p.parse_args(argv)
    if a.child:
        return child(a.child, a.model_dir, a.vector_dir)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench_flops_"))
    model_dir = C.make_model_dir(tmp / "wavlm_base")
    B.task_vector_files(model_dir, tmp)
    rows = {}
    for v in a.variants.split(","):
        rows[v] = C.run_child(__file__, ["--child", v, "--model-dir", model_dir, "--vector-dir", tmp])
        ref = rows[next(iter(rows))]["step_flops"]
        print(f"  {v:15s} forward {rows[v]['forward_flops'] / 1e12:6.3f} TFLOP  step {rows[v]['step_flops'] / 1e12:6.3f}"
              f" TFLOP  x{rows[v]['step_flops'] / ref:.3f}", flush=True)
    C.save_json(a.out, {"machine": C.machine_info(), "command": " ".join(sys.argv), "results": rows})


if __name__ == "__main__":
    main()
