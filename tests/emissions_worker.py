"""Run by tests/test_emissions_resume.py as one of two torchrun "machines" (--nnodes 2, one process each, loopback).

codecarbon's tracker is replaced by tests/fake_tracker.py, counting `1 + node rank` units per measurement, so the two
machines' figures differ. In one output folder each: an uninterrupted run of 4 steps (full/), and a run that stops
after its checkpoint at step 2 and is then resumed from it (resumed/). Rank 0 writes both runs' reports.
"""

import json
import logging
import os
import sys

import fake_tracker
import torch
from conftest import TINY
from datasets import Dataset
from transformers import TrainerCallback

from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.tasks.scripts import end_distributed_process
from hf_dbp.training.training_args import DBPTrainingArguments

logging.basicConfig(level=logging.WARNING)
fake_tracker.install(rate=1.0 + int(os.environ["GROUP_RANK"]))
root = sys.argv[1]


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True


def train(output_dir: str, resume=None, callbacks=()) -> DBPTrainer:
    torch.manual_seed(0)
    config = ViTMAEDBPConfig(
        **TINY,
    )
    data = Dataset.from_dict({"pixel_values": torch.randn(16, 3, 16, 16).numpy()}).with_format("torch")
    args = DBPTrainingArguments(
        emissions_country="FRA",
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        ddp_backend="gloo",
        dataloader_num_workers=0,
    )
    trainer = DBPTrainer(
        model=ViTMAEDBPForPreTraining(config), args=args, train_dataset=data, callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


full = train(os.path.join(root, "full"))
train(os.path.join(root, "resumed"), callbacks=[StopAfterSave()])
resumed = train(os.path.join(root, "resumed"), resume=True)
if int(os.environ["RANK"]) == 0:
    with open(os.path.join(root, "reports.json"), "w") as file:
        json.dump({"full": full.emissions.to_dict(), "resumed": resumed.emissions.to_dict()}, file)
end_distributed_process()  # leave before Python's teardown, where gloo can abort (hf_dbp.tasks.scripts)
