#!/usr/bin/env python
"""What a DBP training step costs over plain BP, measured in one run on one machine.

    python benchmarks/step_overhead.py                      # ViT-B/16 MAE, batches 8 32 64, 2 threads on CPU
    python benchmarks/step_overhead.py --batch_sizes 8 --steps 3 --layers qkv o_proj fc1 patch_embeddings
    python benchmarks/step_overhead.py --batch_sizes 64 --accumulation_steps 1 4 8 \
        --variants bp dbp dbp_map_per_micro_batch --no_memory --no_floor   # gradient accumulation

One step = forward, backward, AdamW step and (for DBP) the decorrelation step, of ViT-B/16 MAE (224 px, mask 0.75,
norm_pix_loss) from the same weights. Three variants run interleaved after warm-up:

- bp: transformers' ViTMAEForPreTraining.
- dbp: hf_dbp's ViTMAEDBPForPreTraining (default DBP settings, sample fraction 0.1).
- reference: the straightforward implementation, kept here as the reference style: explicit R x in every layer,
  one R for each of q, k and v, and the full d^3 product C @ R in every update.
- dbp_map_per_micro_batch (under gradient accumulation only): DBP as it was before the gradient of each reused fold
  was mapped to W once per optimizer step (`hf_dbp.defer_weight_gradients`): `dW = dF R^T` in every micro-batch.
- DBP's levers, as `dbp:<setting>=<value>,...`: `block_size=256` (block-diagonal R), `layers=qkv+o_proj+fc1` (the
  layer kinds decorrelated, instead of --layers), `update_every=4` (R updated every 4th step from the statistics of
  all 4; its step time is then the median of the other phases plus the mean of the decorrelation phase over the timed
  steps, which should be a multiple of 4). Example: `--variants bp dbp dbp:block_size=256 dbp:layers=qkv+fc1`.

With `--accumulation_steps k`, one step is k micro-batches of the batch size (forward and backward each, the loss
divided by k), then AdamW and the decorrelation step, as Trainer runs them: DBP reuses one fold `W R` across the
micro-batches and maps the fold's gradient to W in the last one only (with k = 1 it folds inside the graph).

It prints, per batch size, the ratio of median step times to BP's, the ratio of peak memory (each variant measured
in a fresh process: CPU max RSS, or CUDA max allocated), and the arithmetic floor: the multiply-adds of a DBP step
over BP's, counted by torch's FlopCounterMode on the same step. The table is also written as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_dbp import DECORRELATION_LAYER_KINDS, ViTMAEDBPConfig, ViTMAEDBPForPreTraining, defer_weight_gradients

DBP_VARIANTS = ("dbp", "dbp_map_per_micro_batch")
LEVERS = ("block_size", "layers", "update_every")


def lever_settings(variant: str) -> tuple[str, dict]:
    """`"dbp:block_size=256,update_every=4"` -> `("dbp", {"block_size": 256, "update_every": 4})`."""
    name, _, spec = variant.partition(":")
    settings = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in LEVERS or not value:
            raise ValueError(f"variant {variant!r}: {item!r} is not one of {LEVERS} = value")
        if key == "layers":
            settings[key] = value.split("+")
            if not set(settings[key]) <= set(DECORRELATION_LAYER_KINDS):
                raise ValueError(f"variant {variant!r}: layer kinds are {list(DECORRELATION_LAYER_KINDS)}")
        else:
            settings[key] = int(value)
    if settings and name != "dbp":
        raise ValueError(f"variant {variant!r}: only dbp takes settings")
    return name, settings


class ReferenceDecorrelatedLinear(nn.Module):
    """The straightforward DBP layer: its own R, explicit z = R x, statistics X of a row sample, C @ R update."""

    def __init__(self, layer: nn.Module, sample_fraction: float):
        super().__init__()
        self.layer = layer
        self.conv = isinstance(layer, nn.Conv2d)
        d = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] if self.conv else layer.in_features
        self.R = nn.Parameter(torch.eye(d, device=layer.weight.device), requires_grad=False)
        self.sample_fraction = sample_fraction
        self.X, self.n = None, 0

    def forward(self, x):
        if self.conv:  # explicit: unfold the patches, decorrelate them, then a linear layer with the conv's weight
            b, _, h, w = x.shape
            p = self.layer.kernel_size
            rows = F.unfold(x, p, stride=p).transpose(1, 2)
        else:
            rows = x
        z = rows @ self.R.T
        if self.training:
            flat = z.detach().reshape(-1, z.shape[-1])
            sample = flat[
                torch.randperm(flat.shape[0], device=flat.device)[: max(1, int(flat.shape[0] * self.sample_fraction))]
            ]
            X = sample.T @ sample
            self.X = X if self.X is None else self.X + X
            self.n += sample.shape[0]
        if self.conv:
            out = F.linear(z, self.layer.weight.reshape(self.layer.out_channels, -1), self.layer.bias)
            return out.transpose(1, 2).reshape(b, -1, h // p[0], w // p[1])
        return self.layer(z)

    @torch.no_grad()
    def step(self, lr=1e-3, kappa=1e-2):
        X = self.X / self.n
        C = X - torch.diag(torch.diagonal(X))
        v = torch.diagonal(X) - 1
        self.R -= lr * ((1 - kappa) * C @ self.R + kappa * v[:, None] * self.R)  # the d^3 product every step
        self.X, self.n = None, 0


def reference_model(plain: ViTMAEForPreTraining, kinds, sample_fraction=0.1) -> ViTMAEForPreTraining:
    layers = []
    encoder = plain.vit
    if "patch_embeddings" in kinds:
        pe = encoder.embeddings.patch_embeddings
        pe.projection = ReferenceDecorrelatedLinear(pe.projection, sample_fraction)
        layers.append(pe.projection)
    for block in encoder.layers:
        names = [("attention", n) for n in ("q_proj", "k_proj", "v_proj") if "qkv" in kinds]
        names += [("attention", "o_proj")] if "o_proj" in kinds else []
        names += [("mlp", fc) for fc in ("fc1", "fc2") if fc in kinds]
        for parent, name in names:
            module = getattr(block, parent)
            setattr(module, name, ReferenceDecorrelatedLinear(getattr(module, name), sample_fraction))
            layers.append(getattr(module, name))
    plain.reference_layers = layers
    return plain


class LastMicroBatch:
    """The signal `train_step` gives DBP's layers: True while a step's last micro-batch runs (what accelerate's
    `GradientState().sync_gradients` is under Trainer)."""

    def __init__(self):
        self.value = True

    def __call__(self) -> bool:
        return self.value


def build(variant: str, batch: int, kinds, device, seed=0, accumulation_steps: int = 1):
    torch.manual_seed(seed)  # the same seed gives every variant the same initial weights (checked in the tests)
    variant, settings = lever_settings(variant)
    config = ViTMAEDBPConfig(
        norm_pix_loss=True,
        decorrelation_layers=list(settings.get("layers", kinds)),
        decorrelation_block_size=settings.get("block_size"),
    )  # ViT-B/16, 224 px, mask 0.75
    if variant in DBP_VARIANTS:
        model = ViTMAEDBPForPreTraining(config)
        model.update_every, model.steps_taken = settings.get("update_every", 1), 0
        # As DecorrelationCallback sets them for Trainer: one fold per step under accumulation, and (dbp) its gradient
        # mapped to W in the step's last micro-batch.
        for d in model.decorrelation_modules():
            d.reuse_fold_in_training = accumulation_steps > 1
        if variant == "dbp" and accumulation_steps > 1:
            model.last_micro_batch = LastMicroBatch()
            defer_weight_gradients(model, model.last_micro_batch)
    else:  # built directly, so that its peak memory does not include a DBP model
        model = ViTMAEForPreTraining(ViTMAEConfig(norm_pix_loss=True))
        if variant == "reference":
            model = reference_model(model, kinds)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95))
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).to(device)
    return model, optimizer, pixels


PHASES = ("forward", "backward", "optimizer", "decorrelation")


def train_step(
    variant, model, optimizer, pixels, phases: dict[str, list[float]] | None = None, accumulation_steps: int = 1
):
    """One training step of `accumulation_steps` micro-batches; with `phases`, the seconds of each phase (summed over
    the micro-batches) are appended to it."""
    seconds = dict.fromkeys(PHASES, 0.0)
    last = time.perf_counter()

    def mark(phase):
        nonlocal last
        if phases is not None:
            synchronize(pixels.device)
            now = time.perf_counter()
            seconds[phase] += now - last
            last = now

    for micro_batch in range(accumulation_steps):
        if hasattr(model, "last_micro_batch"):
            model.last_micro_batch.value = micro_batch == accumulation_steps - 1
        loss = model(pixels).loss / accumulation_steps
        mark("forward")
        loss.backward()
        mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer")
    if hasattr(model, "update_every"):
        model.steps_taken += 1
        model.decorrelation_step(update=model.steps_taken % model.update_every == 0)
    elif variant == "reference":
        for layer in model.reference_layers:
            layer.step()
    mark("decorrelation")
    if phases is not None:
        for name, value in seconds.items():
            phases.setdefault(name, []).append(value)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(variant, batch, kinds, device, accumulation_steps: int = 1) -> int:
    model, optimizer, pixels = build(variant, batch, kinds, device, accumulation_steps=accumulation_steps)
    with FlopCounterMode(display=False) as counter:
        train_step(variant, model, optimizer, pixels, accumulation_steps=accumulation_steps)
    return counter.get_total_flops()


def peak_rss_mib() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over from the parent
    across fork and exec, so a child started from this (large) process would report the parent's peak."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(variant: str, batch: int, kinds, device, accumulation_steps: int = 1) -> float:
    """Peak memory of two steps in a fresh process (MiB): peak RSS on CPU, max allocated on CUDA."""
    here = os.path.dirname(os.path.abspath(__file__))
    k = accumulation_steps
    code = (
        f"import sys, json, torch, resource; sys.path.insert(0, {here!r}); import step_overhead as b; "
        f"d = torch.device({str(device)!r}); m, o, p = b.build({variant!r}, {batch}, {list(kinds)!r}, d, 0, {k}); "
        f"b.train_step({variant!r}, m, o, p, None, {k}); b.train_step({variant!r}, m, o, p, None, {k}); "
        "print(json.dumps(torch.cuda.max_memory_allocated() / 2**20 if d.type == 'cuda' else b.peak_rss_mib()))"
    )
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument(
        "--layers", nargs="+", default=list(DECORRELATION_LAYER_KINDS), choices=DECORRELATION_LAYER_KINDS
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=["bp", "dbp", "reference"])
    parser.add_argument(
        "--accumulation_steps",
        type=int,
        nargs="+",
        default=[1],
        help="micro-batches per optimizer step (each of the batch size); one row per batch size and count",
    )
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no_floor", action="store_true", help="skip counting the FLOPs (one more step per variant)")
    parser.add_argument("--output", default="step_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if "bp" not in args.variants:
        parser.error("--variants must include bp: every ratio is to BP's step")
    for v in args.variants:
        try:
            name, settings = lever_settings(v)
        except ValueError as error:
            parser.error(str(error))
        if name not in ("bp", "reference", *DBP_VARIANTS):
            parser.error(f"unknown variant {v!r}")
        if args.steps % settings.get("update_every", 1):
            parser.error(f"{v}: --steps must be a multiple of update_every, so that the timed steps hold whole cycles")
    if "dbp_map_per_micro_batch" in args.variants and max(args.accumulation_steps) == 1:
        parser.error(
            "dbp_map_per_micro_batch differs from dbp under gradient accumulation only (--accumulation_steps)"
        )
    rows = []
    for batch, k in itertools.product(args.batch_sizes, args.accumulation_steps):
        built = {v: build(v, batch, args.layers, device, accumulation_steps=k) for v in args.variants}
        for v in args.variants:  # warm-up: one micro-batch is enough to allocate and cache
            train_step(v, *built[v])
        times = {v: [] for v in args.variants}
        phases = {v: {} for v in args.variants}
        for _ in range(args.steps):  # interleaved, so that drifts of the machine hit every variant alike
            for v in args.variants:
                synchronize(device)
                start = time.perf_counter()
                train_step(v, *built[v], phases=phases[v], accumulation_steps=k)
                synchronize(device)
                times[v].append(time.perf_counter() - start)
        del built
        flops = {} if args.no_floor else {v: count_flops(v, batch, args.layers, device, k) for v in args.variants}
        memory = {} if args.no_memory else {v: peak_memory(v, batch, args.layers, device, k) for v in args.variants}
        base = statistics.median(times["bp"])
        for v in args.variants:  # R updated every k-th step: its update's share is the mean over the steps
            every = lever_settings(v)[1].get("update_every", 1)
            if every > 1:
                others = [t - d for t, d in zip(times[v], phases[v]["decorrelation"], strict=True)]
                times[v] = [statistics.median(others) + statistics.mean(phases[v]["decorrelation"])]
        row = {
            "batch": batch,
            "accumulation_steps": k,
            "layers": args.layers,
            "device": str(device),
            "threads": args.threads,
            "bp_median_s": round(base, 4),
        }
        # Where the time goes: the median seconds of each phase, per variant.
        row["phases_s"] = {v: {k: round(statistics.median(t), 4) for k, t in phases[v].items()} for v in args.variants}
        if memory:
            row["peak_memory_mib"] = {v: round(m, 1) for v, m in memory.items()}
        for v in args.variants:
            if v == "bp":
                continue
            row[f"{v}_time_ratio"] = round(statistics.median(times[v]) / base, 3)
            if flops:
                row[f"{v}_flop_floor"] = round(flops[v] / flops["bp"], 3)
            if memory:
                row[f"{v}_memory_ratio"] = round(memory[v] / memory["bp"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ["batch", "micro-batches", "bp s/step"] + [
        f"{v} {k}" for v in args.variants if v != "bp" for k in ("time", "floor", "memory")
    ]
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        cells = [str(row["batch"]), str(row["accumulation_steps"]), f"{row['bp_median_s']:.3f}"]
        for v in args.variants:
            if v != "bp":
                cells += [
                    f"{row.get(f'{v}_{k}', float('nan')):.3f}" for k in ("time_ratio", "flop_floor", "memory_ratio")
                ]
        print("| " + " | ".join(cells) + " |")
    print("\nWhere the time goes (median seconds per phase and step):\n")
    print("| batch | micro-batches | variant | " + " | ".join(PHASES) + " |\n|" + " --- |" * (3 + len(PHASES)))
    for row in rows:
        for v, seconds in row["phases_s"].items():
            cells = [str(row["batch"]), str(row["accumulation_steps"]), v] + [f"{seconds[p]:.3f}" for p in PHASES]
            print("| " + " | ".join(cells) + " |")
    with open(args.output, "w") as file:
        json.dump(rows, file, indent=1)
    print(f"\nwritten to {args.output}; layers: {' '.join(args.layers)}")


if __name__ == "__main__":
    main()
