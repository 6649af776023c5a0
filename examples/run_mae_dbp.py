#!/usr/bin/env python
"""Pre-train a masked autoencoder ViT with decorrelated backpropagation (DBP-MAE), or the plain BP baseline.

Follows transformers' examples/pytorch/image-pretraining/run_mae.py. Launch with accelerate (one or many processes):

    accelerate launch examples/run_mae_dbp.py                       # offline demo on embedded natural images
    accelerate launch examples/run_mae_dbp.py examples/configs/paper_dbp_vit_b16_imagenet10.yaml
    accelerate launch examples/run_mae_dbp.py --train_dir imgs/ --output_dir out --bp_baseline

A JSON or YAML file as the only argument holds the same fields as the command-line flags.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import datasets
import torch
from datasets import load_dataset
from transformers import (
    AutoConfig,
    ViTImageProcessorPil,
    ViTMAEConfig,
    set_seed,
)

import hf_dbp
from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.core.model import from_pretrained_checked
from hf_dbp.tasks.image_data import (
    DEMO_MODEL,
    DEMO_SETS,
    SAMPLE_INDEX_COLUMN,
    MAEImageTransform,
    augmentation_epoch_callback,
    check_image_folder,
    demo_image_dataset,
    drop_unreadable_images,
    find_image_column,
    fixed_mask_noise,
    with_sample_index,
)
from hf_dbp.tasks.scripts import (
    DecorrelationPresetArguments,
    TrainingBegan,
    image_normalisation,
    parse_script_arguments,
    run_main,
    saved_files,
    setup_logging,
)
from hf_dbp.training.checkpoints import check_pretrained
from hf_dbp.training.hub import checkpoint_not_found, ensure_hub_reachable
from hf_dbp.training.plotting import plot_training_curves
from hf_dbp.training.training_args import DBPTrainingArguments

logger = logging.getLogger(__name__)

# What `accelerate launch examples/run_mae_dbp.py` with no argument runs: a small ViT on crops of scikit-image's
# photographs, a few minutes on 2 CPU cores.
DEMO_ARGS = {
    "output_dir": "outputs/mae-dbp-demo",
    "config_overrides": DEMO_MODEL,
    "norm_pix_loss": True,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "num_train_epochs": 8,
    "base_learning_rate": 1.5e-3,
    "weight_decay": 0.05,
    "adam_beta2": 0.95,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    # R's learning rate and schedule that examples/sweep_bp_dbp.py chose at this size (docs/results.md, "Tuning")
    "decorrelation_lr": 3e-3,
    "decorrelation_lr_schedule": "tied",
    "logging_steps": 8,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "seed": 0,
    "report_to": "none",
}


@dataclass
class DataTrainingArguments:
    """Which data to pre-train and evaluate on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Name of a dataset on the Hub (or a local dataset script-free folder)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: 'image' or 'img')."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "A folder of training images (searched recursively)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of validation images."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for validation when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training images (e.g. a tenth of ImageNet-1K)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation images."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for checking the images."}
    )
    demo_photos: str = field(
        default="default",
        metadata={
            "help": "Without a dataset: which embedded images, 'default' or 'alternate' (another natural-image set of the same kind), or a held-out set no setting was tuned on: 'heldout_photos', 'heldout_faces', 'heldout_terrain'.",
            "choices": list(DEMO_SETS),
        },
    )

    def has_data_source(self) -> bool:
        return self.dataset_name is not None or self.train_dir is not None


@dataclass
class ModelArguments:
    """Which model to pre-train."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A ViTMAE or DBP-MAE checkpoint to start from; leave out to train from scratch."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "A config to train from scratch (name or path), if not the model's."}
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "An image processor (name or path) whose image_mean and image_std to normalise with. Default: the checkpoint's own, else ImageNet's."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values from scratch, e.g. 'image_size=32,patch_size=8,hidden_size=48'."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow a checkpoint's own configuration and image-processor code from the Hub (only for repositories you trust; datasets 5 runs no loading scripts)."
        },
    )
    mask_ratio: float = field(default=0.75, metadata={"help": "Fraction of patches masked."})
    norm_pix_loss: bool = field(default=True, metadata={"help": "Reconstruct per-patch normalised pixels."})


@dataclass
class DBPArguments(DecorrelationPresetArguments):
    """Decorrelated backpropagation settings (see hf_dbp.ViTMAEDBPConfig)."""

    bp_baseline: bool = field(
        default=False,
        metadata={"help": "Train the plain BP model instead (the decorrelation loss is still measured)."},
    )
    decorrelation_lr: float = field(default=1e-3, metadata={"help": "Step size of the R update."})
    decorrelation_kappa: float = field(
        default=1e-2, metadata={"help": "0 = pure decorrelation, 1 = pure variance normalisation."}
    )
    decorrelation_sample_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of rows per forward used for R's statistics."}
    )
    decorrelation_layers: list[str] = field(
        default_factory=lambda: list(hf_dbp.DECORRELATION_LAYER_KINDS),
        metadata={"help": "Layer kinds to decorrelate: patch_embeddings qkv o_proj fc1 fc2."},
    )
    decorrelation_variance_form: str = field(
        default="rows",
        metadata={
            "help": "The variance term of the R update: 'rows' (diag(v) R, the method) or 'columns' (R diag(v), the reference code)."
        },
    )

    def config_values(self) -> dict:
        # Without a block size (flag or preset), a checkpoint's own block size (its R's shape) is kept.
        blocks = {} if self.block_size() is None else {"decorrelation_block_size": self.block_size()}
        return blocks | {
            "decorrelation_lr": self.decorrelation_lr,
            "decorrelation_kappa": self.decorrelation_kappa,
            "decorrelation_sample_fraction": self.decorrelation_sample_fraction,
            "decorrelation_layers": list(self.decorrelation_layers),
            "decorrelation_variance_form": self.decorrelation_variance_form,
        }


@dataclass
class CustomTrainingArguments(DBPTrainingArguments):
    base_learning_rate: float = field(
        default=1.5e-4, metadata={"help": "lr = base_learning_rate * total batch size / 256."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image column for the transform."})


def parse_args():
    return parse_script_arguments(
        (ModelArguments, DataTrainingArguments, DBPArguments, CustomTrainingArguments), DEMO_ARGS
    )


def load_images(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        ds = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    elif data_args.train_dir is not None:
        check_image_folder(data_args.train_dir, "--train_dir")
        if data_args.validation_dir is not None:
            check_image_folder(data_args.validation_dir, "--validation_dir")
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        ds = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    else:
        logger.info(
            "No --dataset_name or --train_dir: using the embedded %s demo set (crops of its images, see hf_dbp.tasks.image_data).",
            data_args.demo_photos,
        )
        ds = demo_image_dataset(seed=seed, photos=data_args.demo_photos)
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict(train=ds)
    if "train" not in ds:
        raise ValueError(f"the dataset has no 'train' split; its splits are {list(ds)}")
    if "validation" not in ds and data_args.train_val_split > 0.0:
        split = ds["train"].train_test_split(data_args.train_val_split, seed=seed)
        ds["train"], ds["validation"] = split["train"], split["test"]
    return ds


def build_model(model_args: ModelArguments, dbp_args: DBPArguments):
    """The DBP model (or the plain one for --bp_baseline), with a clear error for checkpoints of another type."""
    common = {"mask_ratio": model_args.mask_ratio, "norm_pix_loss": model_args.norm_pix_loss}
    load = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    if model_args.model_name_or_path is not None:
        if model_args.config_overrides is not None:
            logger.warning("--config_overrides is ignored: the architecture comes from --model_name_or_path")
        check_pretrained(model_args.model_name_or_path)  # a damaged local checkpoint: its file and what is wrong
        try:
            model_type = AutoConfig.from_pretrained(
                model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **load
            ).model_type
        except OSError as error:  # named here: transformers' message names neither the flag nor the checkpoint
            raise checkpoint_not_found(model_args.model_name_or_path, "--model_name_or_path", error) from None
        if model_type not in (ViTMAEConfig.model_type, ViTMAEDBPConfig.model_type):
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path} is a {model_type!r} model; this script "
                "pre-trains ViTMAE ('vit_mae', e.g. facebook/vit-mae-base) or DBP-MAE ('vit_mae_dbp') checkpoints."
            )
        model = from_pretrained_checked(
            ViTMAEDBPForPreTraining,
            model_args.model_name_or_path,
            **load,
            **common,
            **({} if dbp_args.bp_baseline else dbp_args.config_values()),
        )
        # A DBP checkpoint continued as BP is its plain equivalent: R folded into the weights.
        return model.merge_decorrelation() if dbp_args.bp_baseline else model

    if model_args.config_name is not None:
        config = ViTMAEDBPConfig.from_pretrained(model_args.config_name, **load)
    else:
        config = ViTMAEDBPConfig()
        logger.warning("Training a new model from scratch")
    if model_args.config_overrides is not None:
        config.update_from_string(model_args.config_overrides)
    for key, value in {**common, **dbp_args.config_values()}.items():
        setattr(config, key, value)
    config.check_decorrelation_fields()
    logger.info("Model config: %s", config)
    model = ViTMAEDBPForPreTraining(config)
    return model.merge_decorrelation() if dbp_args.bp_baseline else model


def main() -> None:
    model_args, data_args, dbp_args, training_args = parse_args()
    if training_args.push_to_hub:  # before anything slow: fail now rather than after training
        ensure_hub_reachable(training_args.hub_token)

    setup_logging(training_args, __name__)
    logger.warning(
        "Process rank: %s, device: %s, n_gpu: %s, distributed: %s, bf16: %s, fp16: %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.bf16,
        training_args.fp16,
    )
    method = "BP (plain backpropagation)" if dbp_args.bp_baseline else "DBP (decorrelated backpropagation)"

    set_seed(training_args.seed)
    # The model first: its settings (the DBP flags, the checkpoint's type) are checked before any data is read.
    model = build_model(model_args, dbp_args)
    ds = load_images(data_args, model_args, training_args.seed)
    image_column = find_image_column(ds["train"], data_args.image_column_name)
    for split, max_samples in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split in ds and max_samples is not None:
            ds[split] = ds[split].shuffle(seed=training_args.seed).select(range(min(max_samples, len(ds[split]))))
    with training_args.main_process_first(desc="checking images"):
        for split in ds:
            ds[split], _ = drop_unreadable_images(ds[split], image_column, data_args.preprocessing_num_workers)
            if len(ds[split]) == 0:
                raise ValueError(f"no readable image left in the {split!r} split")

    size = model.config.image_size  # the model's: its position embeddings fix it
    mean, std, source = image_normalisation(
        model_args.image_processor_name,
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    logger.info("Images: %d px, normalised with the mean and std of %s", size, source)
    image_processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    transforms = {
        "train": MAEImageTransform(size, mean=mean, std=std, train=True, seed=training_args.seed),
        "validation": MAEImageTransform(size, mean=mean, std=std, train=False),
    }

    num_patches = (size // model.config.patch_size) ** 2

    def preprocess(split):
        def apply(examples):
            pairs = list(zip(examples[image_column], examples[SAMPLE_INDEX_COLUMN], strict=True))
            batch = {"pixel_values": [transforms[split](image, index) for image, index in pairs]}
            if split == "validation":  # the same masks at every evaluation: the curve measures the weights alone
                batch["noise"] = [fixed_mask_noise(training_args.seed, index, num_patches) for _, index in pairs]
            return batch

        return apply

    for split in ds:
        # Each image's augmentation is seeded by (seed, epoch, its index): reproducible, also when resuming.
        ds[split] = with_sample_index(ds[split])
        ds[split].set_transform(preprocess("train" if split == "train" else "validation"))

    def collate_fn(examples):
        batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
        if "noise" in examples[0]:
            batch["noise"] = torch.stack([torch.as_tensor(e["noise"]) for e in examples])
        return batch

    total_batch = training_args.train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    if training_args.base_learning_rate is not None:
        training_args.learning_rate = training_args.base_learning_rate * total_batch / 256

    steps = (
        math.ceil(len(ds["train"]) / total_batch) * training_args.num_train_epochs
        if training_args.max_steps <= 0
        else training_args.max_steps
    )
    logger.info(
        "%s pre-training of a ViT-MAE (%d layers, width %d, %dpx, patch %d) on %d images (%d for validation): "
        "about %d optimizer steps of %d images at lr %.2e",
        method,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        size,
        model.config.patch_size,
        len(ds["train"]),
        len(ds.get("validation", [])),
        steps,
        total_batch,
        training_args.learning_rate,
    )

    trainer = DBPTrainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds.get("validation"),
        processing_class=image_processor,
        data_collator=collate_fn,
        callbacks=[augmentation_epoch_callback(transforms["train"]), TrainingBegan()],
        decorrelation_config=ViTMAEDBPConfig(**dbp_args.config_values()) if dbp_args.bp_baseline else None,
        model_card_kwargs={
            "datasets": [data_args.dataset_name or data_args.train_dir or "scikit-image photographs (hf-dbp demo)"],
            "base_model": model_args.model_name_or_path,
        },
    )
    # A path is checked; otherwise the newest whole checkpoint in output_dir, if any (hf_dbp.training.checkpoints).
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or True)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    if "validation" in ds:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    trainer.create_model_card()  # now that all_results.json and emissions.csv are final

    if trainer.is_world_process_zero():
        plot_path = os.path.join(training_args.output_dir, "training_curves.png")
        too_few = (
            f"logged every {training_args.logging_steps:g} steps; the run took {trainer.state.global_step}"
            if trainer.state.global_step < training_args.logging_steps
            else None
        )
        plot_training_curves(
            trainer.state.log_history, plot_path, title=f"{method}: MAE pre-training", empty_note=too_few
        )
        last = [r for r in trainer.state.log_history if "decorrelation_loss" in r]
        logger.info(
            "Done: %s, %s. Eval loss %s, decorrelation loss %s. Outputs in %s (load with %s): %s.",
            method,
            trainer.training_summary(),
            f"{metrics['eval_loss']:.4f}" if "validation" in ds else "n/a (no validation split)",
            f"{last[-1]['decorrelation_loss']:.4f}{trainer.carried_note(last[-1]['step'])}"
            if last
            else f"n/a ({too_few})"
            if too_few
            else "n/a",
            os.path.abspath(training_args.output_dir),
            "transformers.ViTMAEForPreTraining.from_pretrained"
            if dbp_args.bp_baseline
            else "`import hf_dbp` then hf_dbp.ViTMAEDBPForPreTraining.from_pretrained",
            saved_files(training_args.output_dir),
        )

    if training_args.push_to_hub:
        trainer.push_to_hub(
            tags=["mae", "vision-transformer", "image-pretraining"] + ([] if dbp_args.bp_baseline else ["dbp"])
        )


if __name__ == "__main__":
    run_main(main)  # a mistake in the arguments prints as one line (hf_dbp.tasks.scripts.run_main)
