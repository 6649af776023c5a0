"""Run by tests/test_distributed.py under torchrun: DBP training with DDP, recording what one R saw on this rank.

Each rank trains on its own shard of the data (DistributedSampler) with gradient accumulation; a forward pre-hook
records the rows that the q/k/v projections of block 0 read (z = R x, with R shared) in every training forward,
so that the test can recompute R from the rows of all ranks, independently of hf_dbp.
"""

import logging
import os
import sys

import torch
from conftest import TINY
from datasets import Dataset

import hf_dbp.training.trainer
from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.tasks.scripts import end_distributed_process
from hf_dbp.training.training_args import DBPTrainingArguments

logging.basicConfig(level=logging.WARNING)
logging.getLogger("hf_dbp").setLevel(logging.INFO)  # the end-of-training check of R across processes reports here
output_dir = sys.argv[1]
rank = int(os.environ["RANK"])
torch.manual_seed(0)
config = ViTMAEDBPConfig(
    **TINY,
    decorrelation_lr=0.05,
    decorrelation_kappa=0.3,
    decorrelation_sample_fraction=1.0,
)
model = ViTMAEDBPForPreTraining(config)
layer = model.vit.layers[0].attention.q_proj
rows = []  # (global step, rows) of every training forward on this rank


patch = model.vit.embeddings.patch_embeddings.projection
deferred = []  # whether the patch conv's weight gradient waited for each step's last micro-batch (DDP's no_sync)


def record(module, args):
    if module.training:
        rows.append((trainer.state.global_step, args[0].detach().reshape(-1, 24).double().clone()))
        deferred.append(patch.decorrelation.is_last_micro_batch is not None)


layer.register_forward_pre_hook(record)
# The exchange of each step's statistics starts after its last micro-batch's forward (DBPTrainer's overlap).
begun = []
_begin = hf_dbp.core.optimizer_hook.begin_decorrelation_step
hf_dbp.core.optimizer_hook.begin_decorrelation_step = lambda modules, *args, **kwargs: (
    begun.append(trainer.state.global_step) or _begin(modules, *args, **kwargs)
)
data = Dataset.from_dict(
    {"pixel_values": torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()}
)
args = DBPTrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=3,
    track_emissions=False,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    ddp_backend="gloo",
    dataloader_num_workers=0,
)
trainer = DBPTrainer(model=model, args=args, train_dataset=data.with_format("torch"))
trainer.train()
torch.save(
    {
        "rows": rows,
        "begun": begun,
        "R": model.vit.layers[0].attention.qkv_decorrelation.R.clone(),
        "deferred": deferred,
        "patch_weight": patch.weight.detach().clone(),
        "losses": [r["decorrelation_loss"] for r in trainer.state.log_history if "decorrelation_loss" in r],
    },
    os.path.join(output_dir, f"rank{rank}.pt"),
)
end_distributed_process()  # leave before Python's teardown, where gloo can abort (hf_dbp.tasks.scripts)
