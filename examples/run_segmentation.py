#!/usr/bin/env python
"""Fine-tune a (DBP-)MAE encoder with UperNet for semantic segmentation on ADE20K, through the datasets library.

Follows transformers' examples/pytorch/semantic-segmentation. Launch with accelerate (one or many processes):

    accelerate launch examples/run_segmentation.py          # offline demo: small ADE20K-layout set, demo encoder
    accelerate launch examples/run_segmentation.py --model_name_or_path outputs/dbp-mae-vit-b16-imagenet10 \\
        --output_dir outputs/upernet-dbp --train_fraction 0.1      # scene_parse_150 from the Hub, 10% of train
    accelerate launch examples/run_segmentation.py --model_name_or_path facebook/vit-mae-base \\
        --data_dir ADEChallengeData2016 --output_dir outputs/upernet-mae

`--model_name_or_path` is a pre-training checkpoint (`vit_mae_dbp` or `vit_mae`: UperNet is built around its
encoder) or an UperNet checkpoint saved by this script (training continues from it). A JSON or YAML file as the only
argument holds the same fields as the flags.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import datasets
import torch
from datasets import load_dataset
from transformers import AutoConfig, set_seed

from hf_dbp import (
    DBPTrainer,
    ViTMAEDBPConfig,
    ViTMAEDBPForPreTraining,
    layer_decay_parameter_groups,
    upernet_around_encoder,
    upernet_from_pretraining_checkpoint,
)
from hf_dbp.tasks.image_data import augmentation_epoch_callback, with_sample_index
from hf_dbp.tasks.image_modes import to_rgb
from hf_dbp.tasks.scripts import (
    TrainingBegan,
    image_normalisation,
    parse_script_arguments,
    run_main,
    saved_files,
    setup_logging,
)
from hf_dbp.tasks.segmentation.ade20k import ade20k_id2label, load_ade20k_folder
from hf_dbp.tasks.segmentation.checks import check_segmentation_pairs
from hf_dbp.tasks.segmentation.demo import make_demo_ade20k
from hf_dbp.tasks.segmentation.evaluation import predict_batch
from hf_dbp.tasks.segmentation.image_processing import IGNORE_INDEX, DBPSegmentationImageProcessor
from hf_dbp.tasks.segmentation.metrics import SegmentationEvaluator
from hf_dbp.tasks.segmentation.plotting import plot_segmentation_examples
from hf_dbp.tasks.segmentation.transforms import SegmentationTransform, segmentation_collate
from hf_dbp.training.checkpoints import check_pretrained
from hf_dbp.training.hub import checkpoint_not_found, ensure_hub_reachable
from hf_dbp.training.training_args import DBPTrainingArguments

logger = logging.getLogger(__name__)

PRETRAINING_DEMO_OUTPUT = "outputs/mae-dbp-demo"  # what `accelerate launch examples/run_mae_dbp.py` writes

# What `accelerate launch examples/run_segmentation.py` with no argument runs, a few minutes on 2 CPU cores.
DEMO_ARGS = {
    "output_dir": "outputs/upernet-dbp-demo",
    "data_dir": "outputs/ade20k-demo",
    "crop_size": 64,
    "upernet_hidden_size": 64,
    "auxiliary_channels": 32,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "num_train_epochs": 10,
    "learning_rate": 1e-3,
    "layer_decay": 0.65,
    "weight_decay": 0.05,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "polynomial",
    "logging_steps": 12,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "seed": 0,
    "report_to": "none",
}


@dataclass
class ModelArguments:
    """The encoder to fine-tune and the UperNet around it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pre-training checkpoint (vit_mae_dbp or vit_mae), or an UperNet checkpoint of this script to continue. Default: the pre-training demo's output if present, else a fresh small encoder."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained config name or path if not the same as model_name_or_path (the weights still come from it)."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "An image processor (name or path) whose image_mean and image_std to normalise with. Default: the checkpoint's own, else ImageNet's."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the models and datasets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (branch name, tag or commit id)."}
    )
    token: str | None = field(
        default=None, metadata={"help": "The token for remote files (default: the one `hf auth login` stored)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow a checkpoint's own configuration code from the Hub (only for repositories you trust)."
        },
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth of the encoder during fine-tuning (the MAE/BEiT ADE20K recipe: 0.1). Default: 0, or a continued UperNet checkpoint's own."
        },
    )
    keep_decorrelation: bool = field(
        default=False,
        metadata={"help": "Keep R and go on decorrelating during fine-tuning (default: fold R into W, a plain ViT)."},
    )
    out_indices: list[int] | None = field(
        default=None, metadata={"help": "Encoder blocks feeding UperNet (1-based; default 4 6 8 12 for 12 blocks)."}
    )
    upernet_hidden_size: int = field(default=512, metadata={"help": "Channels of UperNet's decode head."})
    auxiliary_channels: int = field(default=256, metadata={"help": "Channels of the auxiliary FCN head."})


@dataclass
class DataTrainingArguments:
    """Which data to fine-tune and evaluate on."""

    dataset_name: str = field(
        default="scene_parse_150",
        metadata={"help": "A Hub dataset with image and annotation columns, or a local folder of parquet files."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration (scene_parse_150: scene_parsing)."}
    )
    dataset_revision: str | None = field(
        default=None,
        metadata={"help": "Its revision; scene_parse_150 is read from its parquet conversion, refs/convert/parquet."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "An extracted ADEChallengeData2016 folder (images/ and annotations/); overrides --dataset_name."
        },
    )
    image_column_name: str = field(default="image", metadata={"help": "Column of the images."})
    label_column_name: str = field(default="annotation", metadata={"help": "Column of the annotation maps."})
    train_fraction: float = field(
        default=1.0,
        metadata={"help": "Seeded random fraction of the training split (the paper fine-tuned on a tenth)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many validation pairs."})
    do_reduce_labels: bool = field(
        default=True, metadata={"help": "ADE20K: label 0 ('other') becomes 255 (ignored), k becomes k-1."}
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of train held out for validation when the dataset has no validation split."},
    )
    crop_size: int | None = field(
        default=None,
        metadata={
            "help": "Training crop; evaluation rescales the short side to it. Default: 32 patches of the encoder (512 px for patch 16, the MAE/BEiT ADE20K recipe's 1,024 tokens per crop)."
        },
    )
    eval_window_size: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate with sliding windows of this size (the recipe: 512, the crop) rather than on the whole rescaled image. Predictions are scored at the annotation's resolution either way."
        },
    )
    eval_window_stride: int | None = field(
        default=None,
        metadata={"help": "Step between the sliding windows (default: two thirds of the window, 341 for 512)."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for checking the pairs."})
    num_visualized: int = field(default=4, metadata={"help": "Validation images shown in predictions.png."})


@dataclass
class SegmentationTrainingArguments(DBPTrainingArguments):
    layer_decay: float = field(
        default=0.65, metadata={"help": "Layer-wise lr decay: block i of L gets lr * decay^(L+1-i)."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of the heads."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "Schedule after warm-up."})
    warmup_steps: float = field(
        default=0.1,
        metadata={
            "help": "Warm-up steps, or a fraction of the run below 1 (the default: a tenth of the optimizer steps, whatever their number). The MAE/BEiT recipe's 1,500 steps of its 160k (examples/configs/upernet_mae_vit_b16_ade20k_160k.yaml sets them) would be the whole of a short run."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the raw columns for the transform."})
    batch_eval_metrics: bool = field(
        default=True, metadata={"help": "Reduce each evaluation batch to confusion counts (bounded memory)."}
    )


class SegmentationTrainer(DBPTrainer):
    """DBPTrainer that evaluates at the annotations' resolution through its image processor, and never trains on a
    batch of one image.

    Evaluation batches (they carry `target_sizes`) go through `predict_batch`: the model on the processor's inputs
    (whole images or sliding windows), the logits back to each annotation's size, the class ids scored there; the
    loss is the decode head's cross-entropy at that resolution. So the metrics are those of `pipeline(
    "image-segmentation", model=checkpoint)`'s masks.

    UperNet's pyramid pooling ends in a BatchNorm over 1x1 maps, which fails in training mode on a single image.
    When the training set would leave a last batch of one, that batch is dropped (a different image each epoch);
    evaluation keeps every image."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "target_sizes" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            predictions, loss = predict_batch(
                model,
                self.processing_class,
                inputs["pixel_values"],
                inputs["target_sizes"],
                inputs["labels"],
                max_inputs=self.args.per_device_eval_batch_size,
            )
        # A batch without one labelled pixel still gives every process a loss to gather (0: such batches are rare).
        loss = loss.detach() if loss is not None else torch.zeros((), device=predictions.device)
        if prediction_loss_only:
            return loss, None, None
        labels = inputs["labels"]
        if self.args.world_size > 1:
            # Each process holds its images at their own sizes; the Trainer's gather pads dim 1 only, so both height
            # and width are padded here to the largest of all processes (255: ignored by the metric).
            for dim in (1, 2):
                predictions = self.accelerator.pad_across_processes(predictions, dim=dim, pad_index=IGNORE_INDEX)
                labels = self.accelerator.pad_across_processes(labels, dim=dim, pad_index=IGNORE_INDEX)
        return loss, predictions, labels

    def get_train_dataloader(self):
        drop_last = self.args.dataloader_drop_last
        if len(self.train_dataset) > 1 and len(self.train_dataset) % self._train_batch_size == 1:
            self.args.dataloader_drop_last = True
        try:
            return super().get_train_dataloader()
        finally:
            self.args.dataloader_drop_last = drop_last


def parse_args():
    return parse_script_arguments((ModelArguments, DataTrainingArguments, SegmentationTrainingArguments), DEMO_ARGS)


def load_pairs(
    data_args: DataTrainingArguments, seed: int, model_args: ModelArguments | None = None
) -> datasets.DatasetDict:
    hub = {"cache_dir": model_args.cache_dir, "token": model_args.token} if model_args is not None else {}
    if data_args.data_dir is not None:
        if data_args.data_dir == DEMO_ARGS["data_dir"] and not os.path.isdir(
            os.path.join(data_args.data_dir, "images")
        ):
            logger.info(
                "Generating the demo ADE20K-layout set in %s (textures of scikit-image's photographs)",
                data_args.data_dir,
            )
        if data_args.data_dir == DEMO_ARGS["data_dir"]:
            make_demo_ade20k(data_args.data_dir)
        ds = load_ade20k_folder(data_args.data_dir)
    else:
        name, config, revision = data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision
        if name == "scene_parse_150" and config is None:
            config = "scene_parsing"  # its semantic-segmentation configuration; other datasets get none by default
        if name == "scene_parse_150" and revision is None:
            # datasets 5 runs no loading scripts; the Hub keeps an auto-converted parquet copy, one folder per config.
            revision = "refs/convert/parquet"
        if revision == "refs/convert/parquet":
            ds = load_dataset(name, data_dir=config, revision=revision, **hub)
        else:
            ds = load_dataset(name, config, revision=revision, **hub)
    if "train" not in ds:
        raise ValueError(f"the dataset needs a 'train' split; it has {list(ds)}")
    if "validation" not in ds:
        if not 0.0 < data_args.train_val_split < 1.0:
            raise ValueError(
                f"the dataset has no 'validation' split (it has {list(ds)}) and --train_val_split is "
                f"{data_args.train_val_split}; give a fraction in (0, 1) to hold out of train"
            )
        split = ds["train"].train_test_split(data_args.train_val_split, seed=seed)
        logger.info(
            "No validation split: holding out %d of the %d training pairs (--train_val_split %s)",
            len(split["test"]),
            len(ds["train"]),
            data_args.train_val_split,
        )
        ds = datasets.DatasetDict(train=split["train"], validation=split["test"])
    for split in ds:
        columns = ds[split].column_names
        for column in (data_args.image_column_name, data_args.label_column_name):
            if column not in columns:
                raise ValueError(f"column {column!r} not found in the {split!r} split; its columns are {columns}")
    train = ds["train"]
    if data_args.train_fraction < 1.0:
        train = train.shuffle(seed=seed).select(range(max(1, round(len(train) * data_args.train_fraction))))
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(train))))
    validation = ds["validation"]
    if data_args.max_eval_samples is not None:
        validation = validation.shuffle(seed=seed).select(range(min(data_args.max_eval_samples, len(validation))))
    return datasets.DatasetDict(train=train, validation=validation)


CROP_PATCHES = 32
"""The default crop, in patches per side: 512 px at patch 16, as the MAE/BEiT ADE20K recipe (1,024 tokens)."""


def check_fits_in_memory(encoder, crop_size: int, training_args) -> None:
    """Refuse, before any data is read, a crop and batch whose encoder activations alone cannot fit the memory of the
    device (accelerator memory, or the machine's RAM on the CPU), naming the numbers.

    A lower bound, kept for the backward: per block the attention scores and probabilities (batch x heads x T^2) and
    about 12 activations of width hidden per token (norms, q, k, v, MLP, residuals), T = (crop / patch)^2 tokens."""
    tokens = (crop_size // encoder.patch_size) ** 2
    batch = training_args.per_device_train_batch_size
    width = 2 if training_args.bf16 or training_args.fp16 else 4
    per_block = batch * (2 * encoder.num_attention_heads * tokens**2 + 12 * tokens * encoder.hidden_size) * width
    needed = encoder.num_hidden_layers * per_block
    device = training_args.device
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    else:
        available, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "of free RAM"
    if needed > available:
        raise ValueError(
            f"--crop_size {crop_size} with patch {encoder.patch_size} makes {tokens:,} tokens per image; at "
            f"--per_device_train_batch_size {batch} the encoder's activations alone need about {needed / 2**30:.1f} GiB "
            f"for the backward, and there are {available / 2**30:.1f} GiB {where}. Choose a smaller --crop_size (the "
            f"default is {CROP_PATCHES} patches, {CROP_PATCHES * encoder.patch_size} px here) or batch."
        )
    if needed > 0.5 * available:
        logger.warning(
            "--crop_size %d at batch %d: the encoder's activations alone take about %.1f of the %.1f GiB %s",
            crop_size,
            batch,
            needed / 2**30,
            available / 2**30,
            where,
        )


def pretrained_checkpoint(model_args: ModelArguments) -> str | None:
    """--model_name_or_path, else the pre-training demo's output where it exists, else None (a fresh encoder)."""
    if model_args.model_name_or_path is None and os.path.isfile(os.path.join(PRETRAINING_DEMO_OUTPUT, "config.json")):
        return PRETRAINING_DEMO_OUTPUT
    return model_args.model_name_or_path


def build_model(model_args: ModelArguments, id2label: dict[int, str]):
    upernet = {"hidden_size": model_args.upernet_hidden_size, "auxiliary_channels": model_args.auxiliary_channels}
    checkpoint = pretrained_checkpoint(model_args)
    if checkpoint is not None and model_args.model_name_or_path is None:
        logger.info("No --model_name_or_path: using the pre-training demo's checkpoint %s", checkpoint)
    if checkpoint is not None:
        for path in (checkpoint, model_args.config_name):
            if path is not None:
                check_pretrained(path)  # a damaged local checkpoint: its file and what is wrong
        try:
            config = AutoConfig.from_pretrained(
                model_args.config_name or checkpoint,
                trust_remote_code=model_args.trust_remote_code,
                **load_kwargs(model_args),
            )
        except OSError as error:  # named here: transformers' message names neither the flag nor the checkpoint
            flag = "--config_name" if model_args.config_name else "--model_name_or_path"
            raise checkpoint_not_found(model_args.config_name or checkpoint, flag, error) from None
        return upernet_from_pretraining_checkpoint(
            checkpoint,
            id2label,
            model_args.keep_decorrelation,
            model_args.out_indices,
            drop_path_rate=model_args.drop_path_rate,
            config_name=model_args.config_name,
            load_kwargs=load_kwargs(model_args),
            trust_remote_code=model_args.trust_remote_code,
            config=config,
            **upernet,
        )
    logger.warning(
        "No --model_name_or_path and no pre-training demo output in %s (run `accelerate launch "
        "examples/run_mae_dbp.py` first to fine-tune a pre-trained encoder): starting from a fresh small encoder.",
        PRETRAINING_DEMO_OUTPUT,
    )
    fresh = ViTMAEDBPForPreTraining(
        ViTMAEDBPConfig(
            image_size=32,
            patch_size=4,
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=384,
            decoder_hidden_size=64,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=4,
            decoder_intermediate_size=128,
        )
    )
    return upernet_around_encoder(
        fresh,
        id2label,
        model_args.keep_decorrelation,
        model_args.out_indices,
        source="a fresh (untrained) encoder",
        drop_path_rate=model_args.drop_path_rate or 0.0,
        **upernet,
    )


def load_kwargs(model_args: ModelArguments) -> dict:
    """What every `from_pretrained` of the script gets, as in transformers' example scripts."""
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}


def build_image_processor(
    model_args: ModelArguments, data_args: DataTrainingArguments, checkpoint: str | None, patch: int
) -> DBPSegmentationImageProcessor:
    """The evaluation transform, saved with every checkpoint: rescaling to the crop size, the patch as the padding
    divisor, the sliding windows if asked for, and the normalisation of `--image_processor_name`, else of the
    checkpoint's own image processor (a pre-training checkpoint of run_mae_dbp.py carries one), else ImageNet's."""
    mean, std, source = image_normalisation(
        model_args.image_processor_name,
        checkpoint,
        trust_remote_code=model_args.trust_remote_code,
        **load_kwargs(model_args),
    )
    crop, window, stride = data_args.crop_size, data_args.eval_window_size, data_args.eval_window_stride
    if window is not None and (window < patch or window % patch):
        raise ValueError(
            f"--eval_window_size {window} must be a positive multiple of the encoder's patch ({patch} px), "
            f"e.g. the crop size {crop}"
        )
    if stride is not None and (window is None or not 0 < stride <= window):
        raise ValueError(
            f"--eval_window_stride {stride} needs --eval_window_size and must be in 1..{window or 'it'} "
            "(the recipe: 341 for windows of 512)"
        )
    processor = DBPSegmentationImageProcessor(
        size={"shortest_edge": crop, "longest_edge": 4 * crop},
        size_divisor=patch,
        image_mean=mean,
        image_std=std,
        window_size=data_args.eval_window_size,
        window_stride=data_args.eval_window_stride,
        do_reduce_labels=data_args.do_reduce_labels,
    )
    logger.info(
        "Evaluation: short side %d px, %s, normalisation of %s; scored at the annotations' resolution",
        crop,
        f"sliding windows of {processor.window_size} px, stride {processor.window_stride}"
        if processor.window_size
        else "whole images",
        source,
    )
    return processor


def main() -> None:
    model_args, data_args, training_args = parse_args()
    if not training_args.batch_eval_metrics:
        raise ValueError(
            "--batch_eval_metrics false would gather every prediction of the evaluation: they are at each "
            "annotation's own size, so they neither stack nor fit in memory on ADE20K. Leave it on (each "
            "batch becomes a confusion matrix)."
        )
    if training_args.push_to_hub:  # before anything slow: fail now rather than after training
        ensure_hub_reachable(training_args.hub_token)
    setup_logging(training_args, __name__)

    set_seed(training_args.seed)
    id2label = ade20k_id2label()
    # The model first: the checkpoint is checked, and the crop sized to its encoder, before any data is read.
    model, report = build_model(model_args, id2label)
    logger.info(report)
    encoder = model.config.backbone_config
    patch = encoder.patch_size
    if data_args.crop_size is None:
        data_args.crop_size = CROP_PATCHES * patch
        logger.info(
            "--crop_size %d: %d patches of the encoder's %d px (set --crop_size to choose)",
            data_args.crop_size,
            CROP_PATCHES,
            patch,
        )
    check_fits_in_memory(encoder, data_args.crop_size, training_args)
    image_processor = build_image_processor(model_args, data_args, pretrained_checkpoint(model_args), patch)
    with training_args.main_process_first(desc="preparing the data"):
        ds = load_pairs(data_args, training_args.seed, model_args)
        for split in ds:
            ds[split], _ = check_segmentation_pairs(
                ds[split],
                data_args.image_column_name,
                data_args.label_column_name,
                num_labels=len(id2label),
                reduce_labels=data_args.do_reduce_labels,
                num_proc=data_args.preprocessing_num_workers,
            )
            if len(ds[split]) == 0:
                raise ValueError(f"no usable image/annotation pair left in the {split!r} split")

    normalisation = {"mean": image_processor.image_mean, "std": image_processor.image_std}
    transforms = {
        "train": SegmentationTransform(
            data_args.crop_size,
            train=True,
            reduce_labels=data_args.do_reduce_labels,
            size_divisor=patch,
            seed=training_args.seed,
            **normalisation,
        ),
        # Evaluation is the image processor saved with the checkpoints (what pipeline() runs), labels at full size.
        "validation": SegmentationTransform(
            data_args.crop_size,
            train=False,
            reduce_labels=data_args.do_reduce_labels,
            image_processor=image_processor,
            **normalisation,
        ),
    }

    def preprocess(split):
        def apply(batch):
            return transforms[split].apply_to_batch(batch, data_args.image_column_name, data_args.label_column_name)

        return apply

    raw = {split: ds[split] for split in ds}  # untransformed, for predictions.png
    for split in ds:
        # Each pair's augmentation is seeded by (seed, epoch, its index): reproducible, also when resuming.
        ds[split] = with_sample_index(ds[split]).with_transform(preprocess(split))

    groups = layer_decay_parameter_groups(
        model, training_args.learning_rate, training_args.weight_decay, training_args.layer_decay
    )
    optimizer = torch.optim.AdamW(
        groups, betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon
    )
    logger.info(
        "Fine-tuning UperNet on %d training pairs (%d for validation), %d px crops, lr %.2e with layer decay %.2f",
        len(ds["train"]),
        len(ds["validation"]),
        data_args.crop_size,
        training_args.learning_rate,
        training_args.layer_decay,
    )
    trainer = SegmentationTrainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=image_processor,  # saved in every checkpoint: AutoImageProcessor and pipeline() load it
        data_collator=segmentation_collate,
        compute_metrics=SegmentationEvaluator(len(id2label), ignore_index=255, id2label=id2label),
        optimizers=(optimizer, None),
        callbacks=[augmentation_epoch_callback(transforms["train"]), TrainingBegan()],
        model_card_kwargs={
            "datasets": [data_args.data_dir and f"ADE20K layout: {data_args.data_dir}" or data_args.dataset_name],
            # The encoder it was fine-tuned from, also when the demo's default was used (a Hub id goes into the
            # card's metadata, a local folder into its text).
            "base_model": model_args.model_name_or_path
            or (
                os.path.abspath(PRETRAINING_DEMO_OUTPUT)
                if os.path.isfile(os.path.join(PRETRAINING_DEMO_OUTPUT, "config.json"))
                else None
            ),
        },
    )
    # A path is checked; otherwise the newest whole checkpoint in output_dir, if any (hf_dbp.training.checkpoints).
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or True)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", {k: v for k, v in metrics.items() if not k.startswith("eval_iou_")})
    trainer.save_metrics("eval", metrics)

    trainer.create_model_card()  # now that all_results.json and emissions.csv are final

    if trainer.is_world_process_zero():
        shown = range(min(data_args.num_visualized, len(ds["validation"])))
        batch = segmentation_collate([ds["validation"][i] for i in shown])
        model.eval()
        predictions, _ = predict_batch(
            model, image_processor, batch["pixel_values"].to(model.device), batch["target_sizes"]
        )
        sizes = batch["target_sizes"].tolist()
        plot_segmentation_examples(
            [to_rgb(raw["validation"][i][data_args.image_column_name]) for i in shown],
            [label[:h, :w] for label, (h, w) in zip(batch["labels"], sizes, strict=True)],
            [p[:h, :w].cpu() for p, (h, w) in zip(predictions, sizes, strict=True)],
            os.path.join(training_args.output_dir, "predictions.png"),
            num_labels=len(id2label),
            id2label=id2label,
        )
        logger.info(
            "Done: %s. mean IoU %.4f, mean accuracy %.4f, overall accuracy %.4f on %d validation images. Outputs in "
            "%s: the UperNet checkpoint (load with `import hf_dbp` then AutoModelForSemanticSegmentation"
            ".from_pretrained): %s.",
            trainer.training_summary(),
            metrics["eval_mean_iou"],
            metrics["eval_mean_accuracy"],
            metrics["eval_overall_accuracy"],
            len(ds["validation"]),
            os.path.abspath(training_args.output_dir),
            saved_files(training_args.output_dir),
        )

    if training_args.push_to_hub:
        trainer.push_to_hub(tags=["dbp", "mae", "vision-transformer", "semantic-segmentation", "upernet"])


if __name__ == "__main__":
    run_main(main)  # a mistake in the arguments prints as one line (hf_dbp.tasks.scripts.run_main)
