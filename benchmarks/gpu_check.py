#!/usr/bin/env python
"""The checks that need a GPU, in one short run (a few minutes on one GPU): run it when a machine with CUDA is lent.

    python benchmarks/gpu_check.py --output gpu_check.json

1. Host syncs: ViT-B/16 DBP-MAE training forwards and backwards in bf16 autocast, and the folded (eval) forward, run
   with `torch.cuda.set_sync_debug_mode("error")`: any operation that waits for the GPU raises. The decorrelation
   step runs with the mode at "warn", and the warnings are counted (its one read of the losses and guard is
   expected to be the only one).
2. Step overhead: `benchmarks/step_overhead.py`'s BP and DBP steps, interleaved, in bf16 autocast at the paper
   recipe's per-device batch (64) and at 32: the ratio of median step times.
3. R stays float32 under autocast, and the fold equals the explicit forward.
4. The decorrelation step alone, equal-shaped R updated in stacks (`batch_updates=True`, the default on GPUs) and one
   by one, after the same statistics: median seconds of each (`update_seconds`, which also runs on the CPU).

Writes every figure to `--output` (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import build, train_step  # noqa: E402

import hf_dbp  # noqa: E402
from hf_dbp import DECORRELATION_LAYER_KINDS, DecorrelatedLinear  # noqa: E402


def sync_check(device: torch.device, batch: int) -> dict:
    model, optimizer, pixels = build("dbp", batch, DECORRELATION_LAYER_KINDS, device)
    result = {}
    for step in range(3):  # step 0 warms up (allocations, cuBLAS handles: outside the checked region)
        checked = step > 0
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(pixels).loss
            loss.backward()
        except RuntimeError as error:
            torch.cuda.set_sync_debug_mode("default")
            return {"forward_backward_without_sync": False, "error": str(error)[:2000]}
        torch.cuda.set_sync_debug_mode("default")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if checked else "default")
            model.decorrelation_step()
            torch.cuda.set_sync_debug_mode("default")
        if checked:
            result["decorrelation_step_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    result["forward_backward_without_sync"] = True
    model.eval()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(pixels)
        result["folded_forward_without_sync"] = True
    except RuntimeError as error:
        result["folded_forward_without_sync"] = False
        result["folded_error"] = str(error)[:2000]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    result["R_dtypes"] = sorted({str(m.R.dtype) for m in model.decorrelation_modules()})
    # The fold path against the explicit one, on the same weights and input.
    layer = next(m for m in model.modules() if isinstance(m, DecorrelatedLinear))
    x = torch.randn(4, 50, layer.in_features, device=device)
    with torch.no_grad():
        folded = torch.nn.functional.linear(x, layer.folded_weight(), layer.bias)
        explicit = torch.nn.functional.linear(x @ layer.decorrelation.R.t(), layer.weight, layer.bias)
    result["fold_max_abs_difference"] = float((folded - explicit).abs().max())
    return result


def step_overhead(device: torch.device, batch: int, steps: int) -> dict:
    built = {v: build(v, batch, DECORRELATION_LAYER_KINDS, device) for v in ("bp", "dbp")}
    times = {v: [] for v in built}
    for step in range(steps + 1):
        for variant, (model, optimizer, pixels) in built.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                train_step(variant, model, optimizer, pixels)
            torch.cuda.synchronize()
            if step:
                times[variant].append(time.perf_counter() - start)
    bp, dbp = statistics.median(times["bp"]), statistics.median(times["dbp"])
    return {
        "batch": batch,
        "bp_median_s": round(bp, 4),
        "dbp_median_s": round(dbp, 4),
        "dbp_time_ratio": round(dbp / bp, 3),
    }


def update_seconds(device: torch.device, batch: int = 64, repeats: int = 5) -> dict:
    """Median seconds of ViT-B/16's decorrelation step with and without stacking equal-shaped R, from the statistics
    of one training forward each time (the forward not timed)."""
    model, _, pixels = build("dbp", batch, DECORRELATION_LAYER_KINDS, device)
    modules = model.decorrelation_modules()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {True: [], False: []}
    for repeat in range(repeats + 1):
        for batched in times:
            with torch.no_grad():
                model.vit(pixels)
            sync()
            start = time.perf_counter()
            hf_dbp.decorrelation_step(modules, lr=1e-3, kappa=1e-2, batch_updates=batched)
            sync()
            if repeat:
                times[batched].append(time.perf_counter() - start)
    stacked, one_by_one = statistics.median(times[True]), statistics.median(times[False])
    return {
        "batch": batch,
        "stacked_s": round(stacked, 5),
        "one_by_one_s": round(one_by_one, 5),
        "stacked_over_one_by_one": round(stacked / one_by_one, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; on CPU use benchmarks/step_overhead.py")
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["sync"] = sync_check(device, 64)
    report["step_overhead_bf16"] = [step_overhead(device, batch, args.steps) for batch in args.batch_sizes]
    report["decorrelation_step_update_seconds"] = update_seconds(device)
    text = json.dumps(report, indent=1)
    print(text)
    with open(args.output, "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    main()
