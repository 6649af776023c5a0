"""Run by tests/test_integrations.py under `accelerate launch` (2 CPU processes, gloo): DBP in a plain Accelerate loop.

The loop is what Accelerate's documentation writes (`accelerator.accumulate`, `accelerator.backward`, `optimizer.step()`
at every micro-batch) with `hf_dbp.attach_decorrelation` added. Each process records, into `<output_dir>/rank<k>.pt`:

- `compare`: a run with `sample_fraction=1.0` (every row counts, so the run is comparable with one process over the
  same samples): the hook's optimizer steps, whether R moved at each micro-batch, the final R and weights;
- `resume`: the final R of a run with `sample_fraction=0.5` uninterrupted, resumed with `save_state`/`load_state` from
  a checkpoint after 2 of its 4 optimizer steps with the hook registered for checkpointing, and resumed from one
  saved and loaded without it.

The test imports `build_model`, `dataset` and the settings from here for its one-process reference.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import hf_dbp
from hf_dbp.tasks.scripts import end_distributed_process

GRADIENT_ACCUMULATION_STEPS = 2
BATCH_SIZE = 2  # per process and micro-batch
SAMPLES = 32  # 8 micro-batches per process, 4 optimizer steps
LEARNING_RATE = 0.1
STOP_AFTER = 2  # optimizer steps before the checkpoint of the resume runs


def build_model(sample_fraction: float) -> nn.Module:
    """A small MLP (an `nn.Sequential`) with both linears decorrelated; the same weights at every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = hf_dbp.DecorrelationConfig(target_modules=["0", "2"], lr=0.05, kappa=0.3, sample_fraction=sample_fraction)
    return hf_dbp.decorrelate(model, config, example_inputs=torch.zeros(1, 8))


def dataset() -> torch.utils.data.TensorDataset:
    """Correlated inputs (so that R has something to decorrelate) and random targets."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    return torch.utils.data.TensorDataset(x, torch.randn(SAMPLES, 4, generator=generator))


def matrices(model: nn.Module) -> list[torch.Tensor]:
    return [d.R.detach().clone() for d in hf_dbp.core.model.decorrelation_modules(model)]


def train(
    sample_fraction: float,
    stop_after: int | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
    register: bool = True,
):
    """One run of the loop, stopped after `stop_after` optimizer steps with a checkpoint saved into `checkpoint`, or
    resumed from it; returns (model, hook, whether R moved at each micro-batch)."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS, cpu=True)
    model = build_model(sample_fraction)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH_SIZE)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hook = hf_dbp.attach_decorrelation(optimizer, accelerator.unwrap_model(model))
    if register:
        accelerator.register_for_checkpointing(hook)
    if resume:
        accelerator.load_state(checkpoint)
        loader = accelerator.skip_first_batches(loader, STOP_AFTER * GRADIENT_ACCUMULATION_STEPS)
    moved = []
    for x, y in loader:
        before = matrices(model)
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, matrices(model), strict=True)))
        if stop_after is not None and accelerator.sync_gradients and hook.optimizer_steps == stop_after:
            accelerator.save_state(checkpoint)
            break
    return accelerator.unwrap_model(model), hook, moved


if __name__ == "__main__":
    output_dir = sys.argv[1]
    model, hook, moved = train(sample_fraction=1.0)
    record = {
        "world_size": torch.distributed.get_world_size(),
        "compare": {
            "optimizer_steps": hook.optimizer_steps,
            "moved": moved,
            "R": matrices(model),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        },
    }
    full, _, _ = train(sample_fraction=0.5)
    with_hook, without_hook = os.path.join(output_dir, "with_hook"), os.path.join(output_dir, "without_hook")
    train(sample_fraction=0.5, stop_after=STOP_AFTER, checkpoint=with_hook)
    resumed, resumed_hook, _ = train(sample_fraction=0.5, checkpoint=with_hook, resume=True)
    # Accelerate refuses to load a checkpoint into other registered objects than it was saved with: this one never
    # had the hook's state.
    train(sample_fraction=0.5, stop_after=STOP_AFTER, checkpoint=without_hook, register=False)
    unregistered, _, _ = train(sample_fraction=0.5, checkpoint=without_hook, resume=True, register=False)
    record["resume"] = {
        "full": matrices(full),
        "resumed": matrices(resumed),
        "steps": resumed_hook.optimizer_steps,
        "without_hook_state": matrices(unregistered),
    }
    torch.save(record, os.path.join(output_dir, f"rank{torch.distributed.get_rank()}.pt"))
    end_distributed_process()  # leave before Python's teardown, where gloo can abort (hf_dbp.tasks.scripts)
