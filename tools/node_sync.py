#!/usr/bin/env python3
"""The point where the nodes of a multi-node ``run.sh`` meet after node 0 wrote shared files.

tools/recipe_lib.sh (``node0_end``) starts it on every node under ``torchrun --nnodes N --node_rank R
--master_addr A --master_port P --nproc_per_node 1``: one process per node, so the global rank is the node rank.
Node 0 reaches it only once its step (data preparation, task vectors, ...) is done, and its torchrun agent hosts
the rendezvous store, so the other nodes wait in the rendezvous (``--rdzv_conf timeout``) until then. Node 0 then
broadcasts its exit status: 0 lets every node go on; a failure (recipe_lib.sh's exit trap on node 0) makes the
other nodes stop at once, naming the step, instead of waiting for a launch that never comes.

    python -m torch.distributed.run --nnodes 2 --node_rank 1 --master_addr host0 --master_port 29500 \
        --nproc_per_node 1 -m tools.node_sync --what "stage 0 (data preparation)" --timeout 3600
"""
import argparse
import datetime
import sys

import torch
import torch.distributed as dist

from lobes.distributed import release_process_group


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", required=True, help="the step node 0 ran (named in the messages)")
    p.add_argument("--status", type=int, default=0, help="node 0: the step's exit status (ignored on other nodes)")
    p.add_argument("--timeout", type=float, required=True, help="seconds the collective may wait")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        rank = dist.get_rank()
        status = [args.status if rank == 0 else None]
        dist.broadcast_object_list(status, src=0)
    finally:
        release_process_group()
    if rank == 0:
        return args.status
    if status[0] != 0:
        print(f"node {rank}: node 0 failed during {args.what} (exit status {status[0]}; see its log): "
              "stopping too", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
