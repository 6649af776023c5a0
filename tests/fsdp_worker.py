"""Run by tests/test_distributed.py under torchrun: DBP under FSDP with R left out of the sharding.

The decorrelation modules are ignored by FSDP with the same regex as examples/accelerate_configs/fsdp.yaml
(`fsdp_ignored_modules: ".*_decorrelation"`), so every rank keeps a whole R, updated from statistics summed over
the ranks. Writes this rank's R and losses for the test to compare.
"""

import os
import re
import sys

import torch
import torch.distributed as dist
from conftest import TINY
from torch.distributed.fsdp import FullyShardedDataParallel

from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.tasks.scripts import end_distributed_process

IGNORED = ".*_decorrelation"  # as in examples/accelerate_configs/fsdp.yaml

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
torch.manual_seed(0)
model = ViTMAEDBPForPreTraining(
    ViTMAEDBPConfig(
        **TINY,
        decorrelation_lr=0.05,
    )
)
model.requires_grad_(True)  # a user unfreezing everything: R must still get no gradient (it is read detached)
ignored = [module for name, module in model.named_modules() if re.fullmatch(IGNORED, name)]
sharded = FullyShardedDataParallel(model, device_id=torch.device("cpu"), ignored_modules=ignored, use_orig_params=True)
optimizer = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-3)
pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))  # different data on each rank
losses, r_grads = [], []
for _ in range(3):
    sharded(pixels).loss.backward()
    r_grads.append([d.R.grad is None for d in model.decorrelation_modules()])
    optimizer.step()
    optimizer.zero_grad()
    losses.append(model.decorrelation_step())
torch.save(
    {
        "R": [d.R.clone() for d in model.decorrelation_modules()],
        "losses": losses,
        "ignored": len(ignored),
        "r_grads_none": r_grads,
    },
    os.path.join(sys.argv[1], f"fsdp_rank{rank}.pt"),
)
end_distributed_process()  # leave before Python's teardown, where gloo can abort (hf_dbp.tasks.scripts)
