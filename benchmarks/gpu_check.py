#!/usr/bin/env python
"""The checks that need a GPU, in one run of under 8 minutes on one GPU: run it when a machine with CUDA is lent.

    python benchmarks/gpu_check.py --output gpu_check.json

1. Host syncs: ViT-B/16 DBP-MAE training forwards and backwards in bf16 autocast, and the folded (eval) forward, run
   with `torch.cuda.set_sync_debug_mode("error")`: any operation that waits for the GPU raises. The decorrelation
   step runs with the mode at "warn", and the warnings are counted (its one read of the losses and guard is
   expected to be the only one).
2. Step overhead: `benchmarks/step_overhead.py`'s BP, DBP and DBP with the `fast` preset (block-diagonal R), steps
   interleaved, in bf16 autocast at micro-batches of 64, 128 and 256 images: the ratio of median step times; and the
   same under `torch.compile` at 64 (`--compile_batch_sizes`; each compiled model is built, compiled and warmed up
   first, outside the timing).
3. R stays float32 under autocast, and the fold equals the explicit forward.
4. The decorrelation step alone, equal-shaped R updated in stacks (`batch_updates=True`, the default on GPUs) and one
   by one, after the same statistics: median seconds of each (`update_seconds`, which also runs on the CPU).
5. Convergence: `examples/compare_bp_dbp.py` with the width-384 encoder (6 heads, 8 blocks; a ViT-S-wide model) on
   the embedded photographs, one seed, BP and DBP for `--convergence_steps` steps each (capped at
   `--convergence_minutes` of training each): the steps and seconds DBP saved to BP's best eval loss. Its learning
   rates are the width-192 ones (BP 7.5e-4, DBP 1.5e-3, docs/results.md), not tuned at this size: a check that
   the gain is there on a GPU, not a tuned figure.

Parts 2 and 5 stop adding figures once `--minutes` have passed (what was skipped is listed). Writes every figure to
`--output` (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import build, synchronize, train_step  # noqa: E402

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


FAST = f"dbp:block_size={hf_dbp.DecorrelationConfig.fast().block_size}"
"""The `fast` preset as a variant of `step_overhead.py`."""
STEP_VARIANTS = ("bp", "dbp", FAST)


def step_overhead(device: torch.device, batch: int, steps: int, compiled: bool = False) -> dict:
    """Median seconds per bf16 step of BP, DBP and DBP with the fast preset, interleaved, and DBP's ratios to BP."""
    built = {}
    for variant in STEP_VARIANTS:
        model, optimizer, pixels = build(variant, batch, DECORRELATION_LAYER_KINDS, device)
        built[variant] = (torch.compile(model) if compiled else model, optimizer, pixels)
    times = {v: [] for v in built}
    for step in range(steps + 2):  # two warm-up steps: compilation, and the recompile a changed R may cause
        for variant, (model, optimizer, pixels) in built.items():
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                train_step(variant, model, optimizer, pixels)
            synchronize(device)
            if step > 1:
                times[variant].append(time.perf_counter() - start)
    median = {v: statistics.median(t) for v, t in times.items()}
    row = {"batch": batch, "compiled": compiled}
    row |= {f"{v}_median_s": round(median[v], 4) for v in STEP_VARIANTS}
    row |= {f"{v}_time_ratio": round(median[v] / median["bp"], 3) for v in STEP_VARIANTS if v != "bp"}
    return row


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


WIDTH_384 = (
    "image_size=32,patch_size=4,hidden_size=384,num_hidden_layers=8,num_attention_heads=6,intermediate_size=1536,"
    "decoder_hidden_size=128,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,decoder_intermediate_size=512"
)
"""The ViT-S-wide encoder of the scaling study (issue 27): width 384, 6 heads, 8 blocks, at the demo's 32 px."""


def convergence(steps: int, minutes: float) -> dict:
    """BP against DBP at width 384 on the embedded photographs, seed 0 (see the module's docstring, part 5)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, os.pardir, "examples", "compare_bp_dbp.py")
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, script, "--output_dir", output, "--seeds", "0", "--config_overrides", WIDTH_384]
        command += ["--max_steps", str(steps), "--max_train_minutes", str(minutes), "--eval_steps", "32"]
        command += ["--bp_base_learning_rate", "7.5e-4", "--base_learning_rate", "1.5e-3"]
        subprocess.run(command, check=True)
        with open(os.path.join(output, "comparison.json")) as file:
            comparison = json.load(file)
    return {"command": command[1:], "comparison": {k: v for k, v in comparison.items() if k != "runs"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--compile_batch_sizes", type=int, nargs="*", default=[64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--convergence_steps", type=int, default=2048)
    parser.add_argument("--convergence_minutes", type=float, default=1.5, help="each of the two runs, at most")
    parser.add_argument("--minutes", type=float, default=6.0, help="start no more step timings or runs after this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; on CPU use benchmarks/step_overhead.py")
    device = torch.device("cuda")
    began = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "skipped": []}

    def in_time(what: str) -> bool:
        if time.perf_counter() - began < 60 * args.minutes:
            return True
        report["skipped"].append(what)
        return False

    report["sync"] = sync_check(device, 64)
    report["decorrelation_step_update_seconds"] = update_seconds(device)
    report["step_overhead_bf16"] = []
    timings = [(b, False) for b in args.batch_sizes] + [(b, True) for b in args.compile_batch_sizes]
    for batch, compiled in timings:
        if in_time(f"step overhead at {batch}{' compiled' if compiled else ''}"):
            report["step_overhead_bf16"].append(step_overhead(device, batch, args.steps, compiled))
            print(json.dumps(report["step_overhead_bf16"][-1]), flush=True)
            torch.cuda.empty_cache()
    if in_time("convergence at width 384"):
        report["convergence_width_384"] = convergence(args.convergence_steps, args.convergence_minutes)
    report["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(report, indent=1)
    print(text)
    with open(args.output, "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    main()
