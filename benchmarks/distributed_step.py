#!/usr/bin/env python
"""What DBP's step sends between processes, against the gradients DDP all-reduces, and how long it takes.

    torchrun --nproc_per_node 2 benchmarks/distributed_step.py --models vit_b16 vit_l16    # the paper's sizes
    torchrun --nproc_per_node 2 benchmarks/distributed_step.py --rows_by all_gather  # what NCCL would be sent
    torchrun --nproc_per_node 2 benchmarks/distributed_step.py --models demo --full_step     # the demo, DDP steps
    torchrun --nproc_per_node 2 benchmarks/distributed_step.py --models vit_b16 --full_step --per_device_batch 16 \
        --overlap                                                      # and with the exchange during the backward
    torchrun --nproc_per_node 2 benchmarks/distributed_step.py --transfer_dtype bfloat16 --r_drift_steps 50
                                                                # 16-bit statistics: bytes, and what they do to R

Per model: the encoder runs real training forwards (`--per_device_batch` images of 224 px per process, mask 0.75,
the project's default sample fraction 0.1), so that every R gathers exactly the statistics of a training step, then
`decorrelation_step` combines them across the processes. Every collective it calls is intercepted: the numbers each
process hands to it are counted (and, for the wire, what a ring implementation sends per process: 2 (P - 1) / P of
an all-reduce's input, P - 1 times an all-gather's). The gradients' figures are those of DDP's all-reduce of every
trainable parameter of the whole MAE in float32 (112 M for ViT-B/16); their time is that of one all-reduce of that
many float32 numbers on the same processes. `dbp_before` is the step of hf_dbp 0.1.0 (every R's full d x d matrix
and its count, float32). With `--full_step` (the demo model only, it is small) whole DDP training steps run instead.

With `--transfer_dtype bfloat16` (or float16) the statistics travel in 16 bits; `--r_drift_steps N` then also runs
N steps (encoder forwards on new random images at each step, then the decorrelation step, weights fixed) with two
copies of the model from one initialisation, one exchanging in float32 and one in the lower precision, and reports
how far their R drift apart: per layer ||R_low - R_exact||_F / ||R_exact - I||_F (the difference against how far R
moved), and both copies' decorrelation loss at the last step.

On a CPU-only machine the processes share its cores, and gloo's collectives stand in for NCCL's: the bytes are
exact, the seconds are this machine's. Prints one JSON line per model on rank 0 (and writes them to `--output`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core import collectives
from hf_dbp.core.step import begin_decorrelation_step

MODELS = {
    "demo": dict(
        image_size=32,
        patch_size=4,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=256,
    ),
    "vit_b16": dict(),  # ViTMAEConfig's defaults: ViT-B/16, 224 px, decoder 512 x 8
    "vit_l16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


class Traffic:
    """Counts what each collective call of DBP's step is handed, and times the calls."""

    def __init__(self, world: int, overlap: bool = False) -> None:
        self.world = world
        self.overlap = overlap  # leave async collectives running (their time then shows in the step's)
        self.calls: list[tuple[str, int, int]] = []  # (kind, numel, bytes per element)
        self.call_seconds: list[float] = []
        self._gather, self._reduce = collectives._all_gather_single, dist.all_reduce

    def __enter__(self):
        def gather(output, tensor, *args, **kwargs):
            return self._timed("all_gather", tensor, self._gather, output, tensor, *args, **kwargs)

        def reduce(tensor, *args, **kwargs):
            return self._timed("all_reduce", tensor, self._reduce, tensor, *args, **kwargs)

        collectives._all_gather_single, dist.all_reduce = gather, reduce
        return self

    def _timed(self, kind, tensor, function, *args, **kwargs):
        self.calls.append((kind, tensor.numel(), tensor.element_size()))
        start = time.perf_counter()
        work = function(*args, **kwargs)
        if work is not None and not self.overlap:  # async: its wait is timed here (a later wait returns at once)
            work.wait()
        self.call_seconds.append(time.perf_counter() - start)
        return work

    def __exit__(self, *exc):
        collectives._all_gather_single, dist.all_reduce = self._gather, self._reduce

    @contextlib.contextmanager
    def paused(self):
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

    def handed_bytes(self) -> int:
        return sum(numel * size for _, numel, size in self.calls)

    def wire_bytes(self) -> float:
        """Bytes one process sends in ring implementations of these collectives."""
        p = self.world
        return sum(
            numel * size * (2 * (p - 1) / p if kind == "all_reduce" else p - 1) for kind, numel, size in self.calls
        )


def time_all_reduce(numel: int, repeats: int = 3) -> float:
    buffer = torch.zeros(numel, dtype=torch.float32)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(name: str, args, world: int, rank: int) -> dict:
    torch.manual_seed(0)
    config = ViTMAEDBPConfig(
        **MODELS[name], norm_pix_loss=True, mask_ratio=0.75, decorrelation_sample_fraction=args.sample_fraction
    )
    model = ViTMAEDBPForPreTraining(config).train()
    modules = model.decorrelation_modules()
    gradients = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pixels = torch.randn(
        args.per_device_batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(rank)
    )
    ddp = optimizer = None
    if args.full_step:
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4)
    handed, wire, seconds, step_seconds, rows_per_process = [], [], [], [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        pending = None
        with Traffic(world, overlap=args.overlap) as traffic:
            if args.full_step:
                loss = ddp(pixels).loss
                rows_per_process = [m.num_rows for m in modules]
                if args.overlap:  # the exchange runs during the backward, as DBPTrainer does
                    pending = begin_decorrelation_step(modules, transfer_dtype=args.transfer_dtype)
                with traffic.paused():
                    loss.backward()  # DDP's gradient all-reduce: not DBP's traffic
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model.vit(pixels)  # the encoder's training forward: every R gathers a step's statistics
                rows_per_process = [m.num_rows for m in modules]
                dist.barrier()  # the collectives' time, not the wait for a process that is still in its forward
            model.decorrelation_step(pending=pending, transfer_dtype=args.transfer_dtype)
        if step >= args.warmup:
            handed.append(traffic.handed_bytes())
            wire.append(traffic.wire_bytes())
            seconds.append(traffic.call_seconds)
            step_seconds.append(time.perf_counter() - start)
    before = sum(m.dim * m.dim + 1 for m in modules)
    result = {
        "model": name,
        "processes": world,
        "per_device_batch": args.per_device_batch,
        "sample_fraction": args.sample_fraction,
        "matrices_R": len(modules),
        "rows_per_process": sorted(set(rows_per_process)),
        "gradient_bytes": 4 * gradients,
        "dbp_handed_bytes": handed[-1],
        "dbp_handed_ratio": round(handed[-1] / (4 * gradients), 4),
        "dbp_wire_bytes": round(wire[-1]),
        "gradient_wire_bytes": round(4 * gradients * 2 * (world - 1) / world),
        "dbp_before_handed_bytes": 4 * before,
        "dbp_before_ratio": round(before / gradients, 4),
        "dbp_calls": [f"{kind} of {numel} x {size} B" for kind, numel, size in traffic.calls],
        "dbp_collective_s": round(statistics.median(sum(s) for s in seconds), 4),
        "dbp_collective_s_per_call": [
            round(statistics.median(s[i] for s in seconds), 4) for i in range(len(seconds[0]))
        ],
        "dbp_collective_s_per_step": [round(sum(s), 4) for s in seconds],
        "gradient_all_reduce_s": round(time_all_reduce(gradients), 4),
        "dbp_before_all_reduce_s": round(time_all_reduce(before), 4),
        "threads_per_process": torch.get_num_threads(),
        "full_step": args.full_step,
        "overlap": args.overlap,
        "rows_by": args.rows_by,
        "transfer_dtype": args.transfer_dtype,
    }
    if args.full_step:
        result["median_step_s"] = round(statistics.median(step_seconds), 4)
        if not args.overlap:
            result["dbp_collective_share"] = round(result["dbp_collective_s"] / result["median_step_s"], 4)
    if args.r_drift_steps:
        result |= r_drift(config, args, rank)
    return result


@torch.no_grad()
def r_drift(config: ViTMAEDBPConfig, args, rank: int) -> dict:
    """Two copies of one model, R exchanged in float32 and in `args.transfer_dtype`, after `args.r_drift_steps`."""
    torch.manual_seed(0)
    exact = ViTMAEDBPForPreTraining(config).train()
    low = ViTMAEDBPForPreTraining(config).train()
    low.load_state_dict(exact.state_dict())  # and both draw their rows from one seed: the transfer alone differs
    images = torch.Generator().manual_seed(100 + rank)
    losses = {}
    for step in range(args.r_drift_steps):
        pixels = torch.randn(args.per_device_batch, 3, config.image_size, config.image_size, generator=images)
        for key, model, dtype in (("exact", exact, None), ("low", low, args.transfer_dtype)):
            torch.manual_seed(1000 * step + rank)  # the same masks for both copies
            model.vit(pixels)
            losses[key] = model.decorrelation_step(transfer_dtype=dtype)
    drift = []
    for a, b in zip(exact.decorrelation_modules(), low.decorrelation_modules(), strict=True):
        moved = torch.linalg.matrix_norm(a.R - torch.eye(a.dim))
        drift.append(float(torch.linalg.matrix_norm(b.R - a.R) / moved))
    return {
        "r_drift_steps": args.r_drift_steps,
        "decorrelation_lr": config.decorrelation_lr,
        "r_drift_relative_max": round(max(drift), 5),
        "r_drift_relative_median": round(statistics.median(drift), 5),
        "decorrelation_loss_exact": losses["exact"],
        "decorrelation_loss_low": losses["low"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"], choices=sorted(MODELS))
    parser.add_argument("--per_device_batch", type=int, default=64, help="the paper recipe's (examples/configs)")
    parser.add_argument("--sample_fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full_step", action="store_true", help="whole DDP training steps")
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="with --full_step: start DBP's exchange after the forward, so that it runs during the "
        "backward (what DBPTrainer does on several processes)",
    )
    parser.add_argument(
        "--rows_by",
        choices=["auto", "all_gather", "all_reduce"],
        default="auto",
        help="how rows travel: the backend's choice (gloo: all-reduce slots), or force one (to see on "
        "CPU processes what NCCL's all-gather sends)",
    )
    parser.add_argument(
        "--transfer_dtype",
        choices=list(collectives.TRANSFER_DTYPES),
        default="float32",
        help="precision DBP's statistics travel in (DBPTrainer: --decorrelation_transfer_dtype)",
    )
    parser.add_argument(
        "--r_drift_steps",
        type=int,
        default=0,
        help="with --transfer_dtype: also run this many steps in both precisions and compare R",
    )
    parser.add_argument("--output", default=None, help="also write the JSON lines here (rank 0)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo")
    if args.rows_by != "auto":
        collectives.rows_by_all_gather = lambda group=None: args.rows_by == "all_gather"
    lines = [json.dumps(measure(name, args, world, rank)) for name in args.models]
    if rank == 0:
        print("\n".join(lines), flush=True)
        if args.output:
            with open(args.output, "w") as file:
                file.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
