"""Run by tests/test_engines.py on 2 CPU processes: DBP under FSDP2 (`fully_shard`), R left out of the sharding.

Launched with `accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml`: accelerate builds its FSDP2
plugin from that file (the ignored-modules regex, the blocks to wrap, resharding after forward) and its own
`fsdp2_prepare_model` shards the model with it. Accelerate's `Accelerator` runs FSDP on GPUs only, so it is not built:
a stand-in gives `fsdp2_prepare_model` what it reads from one (its plugin, device and precision). Then
`hf_dbp.attach_decorrelation` takes the decorrelation step after each optimizer step, with 2 micro-batches per step
(every micro-batch then reads the cached fold W R while FSDP2 frees and gathers the whole W around every forward and
backward). Each process also trains an unsharded copy on the micro-batches of both processes, on its own: the
reference. Per step it records the gradients (the whole ones, gathered from the shards), the outputs of an evaluation
forward after the step (the cached fold again) and the decorrelation loss, for the test to compare.
"""

import copy
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from conftest import TINY
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import hf_dbp
from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.tasks.scripts import end_distributed_process

STEPS, MICRO_BATCHES, BATCH = 3, 2, 16  # 16 images x 5 tokens: more rows than outputs, so every linear layer folds

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
alone = [dist.new_group([r]) for r in range(world)][rank]  # the reference's statistics stay on its own process
torch.set_num_threads(1)
torch.manual_seed(0)
model = ViTMAEDBPForPreTraining(
    ViTMAEDBPConfig(
        **TINY,
        decorrelation_lr=0.05,
        decorrelation_sample_fraction=1.0,
    )
)
reference = copy.deepcopy(model)
initial = copy.deepcopy(model.state_dict())
ignored = hf_dbp.fsdp_ignored_params(model)
plugin = FullyShardedDataParallelPlugin()  # from the environment accelerate launch set from the config file
assert plugin.fsdp_version == 2 and plugin.ignored_modules == hf_dbp.FSDP_IGNORED_MODULES, plugin
accelerator = SimpleNamespace(
    state=SimpleNamespace(fsdp_plugin=plugin),
    mixed_precision="no",
    is_main_process=rank == 0,
    device=torch.device("cpu"),
)
model = fsdp2_prepare_model(accelerator, model)

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # holds R too: attach_decorrelation takes it out
hook = hf_dbp.attach_decorrelation(optimizer, model, gradient_accumulation_steps=MICRO_BATCHES)
reference_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
for d in reference.decorrelation_modules():
    d.reuse_fold_in_training = True


def data(seed: int, count: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator), torch.rand(count, 16, generator=generator)


def batch(step: int, micro: int, process: int):
    return data(1000 * step + 10 * micro + process)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


evaluation = data(99, 4)
record = {
    "grads": [],
    "reference_grads": [],
    "outputs": [],
    "reference_outputs": [],
    "losses": [],
    "reference_losses": [],
}
for step in range(STEPS):
    model.train()
    reference.train()
    for micro in range(MICRO_BATCHES):
        pixels, noise = batch(step, micro, rank)
        (model(pixels, noise=noise).loss / MICRO_BATCHES).backward()
        if micro == MICRO_BATCHES - 1:
            hook.begin()  # the statistics travel during the last backward, as DBPTrainer does
        for process in range(world):  # FSDP2 averages the gradients over the processes
            pixels, noise = batch(step, micro, process)
            (reference(pixels, noise=noise).loss / (MICRO_BATCHES * world)).backward()
    record["grads"].append({n: whole(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None})
    record["reference_grads"].append(
        {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    )
    optimizer.step()  # the decorrelation step follows (the hook)
    optimizer.zero_grad()
    reference_optimizer.step()
    reference_optimizer.zero_grad()
    record["reference_losses"].append(hf_dbp.decorrelation_step(reference, process_group=alone))
    record["losses"].append(hook.losses[-1])
    model.eval()
    reference.eval()
    with torch.no_grad():
        record["outputs"].append(model(*evaluation[:1], noise=evaluation[1]).logits)
        record["reference_outputs"].append(reference(*evaluation[:1], noise=evaluation[1]).logits)

record["R"] = [d.R.clone() for d in model.decorrelation_modules()]
record["reference_R"] = [d.R.clone() for d in reference.decorrelation_modules()]
# Saving and loading: the whole state dict holds every R as it is; loading weights drops the cached folds.
saved = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
record["saved_R"] = {k: v.clone() for k, v in saved.items() if k.endswith("_decorrelation.R")}
record["folds_before_load"] = sum(m._folded_cache is not None for m in model.modules() if hasattr(m, "_folded_cache"))
reference.load_state_dict(initial)
set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True))
record["folds_after_load"] = sum(m._folded_cache is not None for m in model.modules() if hasattr(m, "_folded_cache"))
with torch.no_grad():
    record["loaded_output"] = model(*evaluation[:1], noise=evaluation[1]).logits
    record["reference_loaded_output"] = reference(*evaluation[:1], noise=evaluation[1]).logits

fc1 = model.vit.layers[0].mlp.fc1.weight
record.update(
    sharded_blocks=sum(isinstance(m, FSDPModule) for m in model.modules()),
    R_types=sorted({type(d.R).__name__ for d in model.decorrelation_modules()}),
    ignored=len(ignored),
    weight_shard=(fc1.to_local().numel(), fc1.numel()),
    optimizer_holds_R=any(p is R for group in optimizer.param_groups for p in group["params"] for R in ignored),
    hook_steps=hook.optimizer_steps,
)
torch.save(record, os.path.join(sys.argv[1], f"fsdp2_rank{rank}.pt"))
end_distributed_process()  # leave before Python's teardown, where gloo can abort (hf_dbp.tasks.scripts)
