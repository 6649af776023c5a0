"""Run by tests/test_engines.py under torchrun (2 CPU processes, gloo): DBPTrainer under DeepSpeed ZeRO-2 and ZeRO-3.

One process trains twice, through the transformers Trainer with the configs examples/deepspeed/zero2.json and
zero3.json (batch sizes "auto"; the small-parameter threshold of ZeRO-3 at 0 so that this tiny model's weights are
partitioned as a large model's are). The model is loaded with `from_pretrained` from a checkpoint whose R are not the
identity, after the DeepSpeed config is known: under ZeRO-3 transformers then builds it inside `deepspeed.zero.Init`,
which partitions every parameter, R included, before DBPTrainer gets it. Writes what the test checks, per stage.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from accelerate.state import AcceleratorState
from conftest import TINY
from datasets import Dataset

from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.tasks.scripts import end_distributed_process
from hf_dbp.training.training_args import DBPTrainingArguments

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"

out = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")  # before the model: zero.Init reads the world size from it
rank = torch.distributed.get_rank()
torch.set_num_threads(1)
torch.manual_seed(0)
model = ViTMAEDBPForPreTraining(
    ViTMAEDBPConfig(
        **TINY,
        decorrelation_lr=0.05,
        decorrelation_kappa=0.3,
        decorrelation_sample_fraction=1.0,
    )
)
with torch.no_grad():
    for d in model.decorrelation_modules():
        d.R.add_(0.01 * torch.randn(d.R.shape))  # not representable in 16 bits
start_R = [d.R.clone() for d in model.decorrelation_modules()]  # the same on every process (one seed)
if rank == 0:
    model.save_pretrained(out / "start")
torch.distributed.barrier()


def recorder(rows: list, trainer):
    def record(module, inputs):
        if module.training:
            rows.append((trainer.state.global_step, inputs[0].detach().reshape(-1, 24).double()))

    return record


data = Dataset.from_dict(
    {"pixel_values": torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()}
)
results = {}
for stage in (2, 3):
    config = json.loads((CONFIGS / f"zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    args = DBPTrainingArguments(
        output_dir=str(out / f"zero{stage}"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-3,
        bf16=True,
        use_cpu=True,
        deepspeed=config,
        track_emissions=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    model = ViTMAEDBPForPreTraining.from_pretrained(out / "start")
    partitioned_on_load = sum(hasattr(d.R, "ds_id") for d in model.decorrelation_modules())
    trainer = DBPTrainer(model=model, args=args, train_dataset=data.with_format("torch"))
    rows = []  # (optimizer step, the rows q, k and v read) of every training forward, for the test's own DBP step
    model.vit.layers[0].attention.q_proj.register_forward_pre_hook(recorder(rows, trainer))
    prepared_R = [d.R.clone() for d in model.decorrelation_modules()]
    trainer.train()
    fc1 = model.vit.layers[0].mlp.fc1.weight
    results[stage] = {
        "partitioned_on_load": partitioned_on_load,
        "prepared_R": prepared_R,
        "R": [d.R.clone() for d in model.decorrelation_modules()],
        "qkv_R": model.vit.layers[0].attention.qkv_decorrelation.R.clone(),
        "rows": rows,
        "R_parameters": sum(isinstance(d.R, torch.nn.Parameter) for d in model.decorrelation_modules()),
        "R_dtypes": sorted({str(d.R.dtype) for d in model.decorrelation_modules()}),
        "weight_dtype": str(fc1.dtype),
        "weight_local": fc1.ds_tensor.numel() if hasattr(fc1, "ds_tensor") else fc1.numel(),
        "weight_numel": fc1.ds_numel if hasattr(fc1, "ds_numel") else fc1.numel(),
        "hook_steps": trainer.decorrelation_callback.hook.optimizer_steps,
        "global_steps": trainer.state.global_step,
        "optimizer": type(trainer.optimizer.optimizer).__name__,
        "parameter_groups": len(trainer.optimizer.optimizer.optimizer.param_groups),  # the torch AdamW inside ZeRO's
        "losses": [r["decorrelation_loss"] for r in trainer.state.log_history if "decorrelation_loss" in r],
    }
    trainer.save_model(str(out / f"zero{stage}" / "final"))  # ZeRO-3: the 16-bit weights gathered (the config)
    AcceleratorState._reset_state()  # the next Trainer sets up its own DeepSpeed
torch.save({"start_R": start_R, **results}, out / f"rank{rank}.pt")
end_distributed_process()  # leave before Python's teardown, where gloo can abort (hf_dbp.tasks.scripts)
