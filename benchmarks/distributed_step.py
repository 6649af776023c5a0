#!/usr/bin/env python
"""Time of a DBP-MAE training step on 1 or N processes, and the share spent in DBP's statistics all-reduce.

    torchrun --nproc_per_node 1 benchmarks/distributed_step.py
    torchrun --nproc_per_node 2 benchmarks/distributed_step.py

The global batch is the same for every process count (split evenly), so the times compare. On a CPU-only machine
the processes share its cores (torch threads = cores / processes). Prints one JSON line on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--global_batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = ViTMAEDBPConfig(  # the demo's model: 4 blocks, width 96, 32 px, patch 4
        image_size=32, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=384, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=256, norm_pix_loss=True,
    )  # fmt: skip
    model = ViTMAEDBPForPreTraining(config)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = args.global_batch // world
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(rank))

    # Time DBP's collective: the one all-reduce of decorrelation_step (DDP's gradient all-reduce goes elsewhere).
    collective_seconds = []
    all_reduce = dist.all_reduce

    def timed_all_reduce(tensor, *a, **k):
        start = time.perf_counter()
        result = all_reduce(tensor, *a, **k)
        collective_seconds.append(time.perf_counter() - start)
        return result

    step_seconds, decorrelation_seconds, per_step_collective = [], [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        ddp(pixels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        collective_seconds.clear()
        dist.all_reduce = timed_all_reduce
        decorrelation_start = time.perf_counter()
        model.decorrelation_step()
        decorrelation_end = time.perf_counter()
        dist.all_reduce = all_reduce
        if step >= args.warmup:
            step_seconds.append(decorrelation_end - start)
            decorrelation_seconds.append(decorrelation_end - decorrelation_start)
            per_step_collective.append(sum(collective_seconds))
    if rank == 0:
        median = statistics.median(step_seconds)
        collective = statistics.median(per_step_collective)
        print(json.dumps({
            "processes": world, "global_batch": args.global_batch, "threads_per_process": torch.get_num_threads(),
            "median_step_s": round(median, 4), "median_decorrelation_step_s": round(statistics.median(decorrelation_seconds), 5),
            "median_dbp_all_reduce_s": round(collective, 5), "dbp_all_reduce_share": round(collective / median, 4),
            "all_reduce_calls_per_step": len(collective_seconds) if world > 1 else 0,
        }))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
