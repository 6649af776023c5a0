"""End-to-end tests of examples/run_segmentation.py.

Each test runs the script for real, in a subprocess, offline, on a tiny ADE20K-layout data set (8 training and 4
validation pairs of 32 px, from `make_demo_ade20k`) and a tiny DBP-MAE pre-training checkpoint whose R are moved away
from the identity (so folding them into W changes the weights), with small UperNet heads and 2 optimizer steps. All
runs are started once, by the module-scoped fixture `runs`, two at a time: most of a run's time is its imports, on
one core.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SEGMENTATION_SCRIPT, TINY_ENCODER, Run, offline_env, read_json, training_records
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import (
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    BertConfig,
    BertModel,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    pipeline,
)

import hf_dbp
from hf_dbp.tasks.segmentation.ade20k import load_ade20k_folder
from hf_dbp.tasks.segmentation.demo import make_demo_ade20k
from hf_dbp.tasks.segmentation.evaluation import predict_batch
from hf_dbp.tasks.segmentation.transforms import SegmentationTransform, segmentation_collate

SCRIPT = SEGMENTATION_SCRIPT

TINY_MODEL = dict(TINY_ENCODER)
NUM_R = 1 + 4 * TINY_MODEL["num_hidden_layers"]  # the patch embedding, then qkv, o_proj, fc1 and fc2 of each block
# Two optimizer steps of 4 pairs, a log record after each, nothing saved but the final model.
TINY_FLAGS = [
    "--upernet_hidden_size",
    "16",
    "--auxiliary_channels",
    "8",
    "--crop_size",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "4",
    "--max_steps",
    "2",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--dataloader_num_workers",
    "0",
    "--warmup_steps",
    "0",
]
RESULT_METRICS = ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy")
R_SUFFIX = "_decorrelation.R"


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def run_script(*args, hf_home: Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run the script with plain Python; stdout and stderr merged."""
    env = offline_env(hf_home)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def assert_succeeded(run: Run) -> None:
    run.assert_succeeded()


def assert_failed_before_training(run: Run) -> str:
    """The run exited non-zero without training or saving; returns its one error line."""
    assert run.result.returncode != 0, f"the script should have failed:\n{run.output[-3000:]}"
    assert not (run.output_dir / "trainer_state.json").exists()
    assert not (run.output_dir / "model.safetensors").exists()
    assert "Fine-tuning UperNet on" not in run.output
    # One line, no traceback: the user's mistake, not the script's.
    assert "Traceback" not in run.output, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("run_segmentation.py: error: ")]
    assert errors, f"no error line in the output:\n{run.output[-3000:]}"
    return errors[-1]


def pair_counts(output: str) -> tuple[int, int]:
    """(training, validation) pair counts from the script's 'Fine-tuning UperNet on N training pairs (M ...' log."""
    match = re.search(r"Fine-tuning UperNet on (\d+) training pairs \((\d+) for validation\)", output)
    assert match, f"no pair count in the log:\n{output[-3000:]}"
    return int(match.group(1)), int(match.group(2))


def assert_results(output_dir: Path) -> dict:
    """all_results.json holds a finite train loss and the three segmentation metrics, finite and in [0, 1]."""
    results = read_json(output_dir / "all_results.json")
    assert isinstance(results.get("train_loss"), float) and math.isfinite(results["train_loss"]), results
    for key in RESULT_METRICS:
        assert key in results, f"{key} missing from all_results.json: {sorted(results)}"
        assert isinstance(results[key], float) and math.isfinite(results[key]), (key, results[key])
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    return results


def load_upernet(output_dir: Path):
    """The saved UperNet, loaded as a user would (hf_dbp imported), with every weight found in the file."""
    model, info = AutoModelForSemanticSegmentation.from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def r_matrices(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """name (without `prefix`) -> R of every decorrelation module of `model`."""
    return {
        name.removeprefix(prefix): param.detach().clone()
        for name, param in model.named_parameters()
        if name.endswith(R_SUFFIX)
    }


def log_lines(output: str, needle: str) -> list[str]:
    return [line for line in output.splitlines() if needle in line]


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and runs, shared by the tests


@dataclass
class Inputs:
    data_dir: Path  # 8 + 4 clean pairs
    messy_dir: Path  # the same with bad pairs, see `make_messy`
    dbp_checkpoint: Path
    plain_checkpoint: Path
    bert_checkpoint: Path
    parquet_dir: Path  # train.parquet only (12 pairs), with columns "pixels", "segmentation", "name"
    no_annotation_dir: Path  # train/validation parquet with columns "image", "caption"
    frozen_dbp_checkpoint: Path  # the DBP checkpoint's weights and R, with decorrelation_lr 0
    vit_processor: Path  # a ViTImageProcessor with a normalisation of its own


PLAIN_CLS_TOKEN = 0.5  # a class-token value no initialisation gives


def make_dbp_checkpoint(path: Path, decorrelation_lr: float = 1e-3) -> None:
    torch.manual_seed(0)
    model = hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_MODEL, decorrelation_lr=decorrelation_lr))
    with torch.no_grad():
        for module in model.decorrelation_modules():  # far enough from I that folding changes W visibly
            module.R.add_(0.1 * torch.randn_like(module.R))
    model.save_pretrained(path)


def make_plain_checkpoint(path: Path) -> None:
    torch.manual_seed(1)
    model = ViTMAEForPreTraining(ViTMAEConfig(**TINY_MODEL))
    with torch.no_grad():
        model.vit.embeddings.cls_token.fill_(PLAIN_CLS_TOKEN)
    model.save_pretrained(path)


def load_image(path: Path) -> PILImage.Image:
    with PILImage.open(path) as image:
        image.load()
        return image.copy()


def make_parquet(data_dir: Path, out: Path) -> None:
    """All 12 pairs of `data_dir` as one train.parquet (no validation split), under non-default column names."""
    out.mkdir()
    features = Features({"pixels": Image(), "segmentation": Image(), "name": Value("string")})
    pairs = [
        (p, data_dir / "annotations" / folder / f"{p.stem}.png")
        for folder in ("training", "validation")
        for p in sorted((data_dir / "images" / folder).glob("*.jpg"))
    ]
    Dataset.from_dict(
        {
            "pixels": [load_image(image) for image, _ in pairs],
            "segmentation": [load_image(annotation) for _, annotation in pairs],
            "name": [image.stem for image, _ in pairs],
        },
        features=features,
    ).to_parquet(str(out / "train.parquet"))


# The bad pairs of the messy set, by file stem.
WRONG_SIZE = "ADE_train_00000001"  # (a) the annotation is 4 px wider than its image
LABEL_200 = "ADE_train_00000002"  # (b) label 200 > 150
NO_ANNOTATION = "ADE_train_00000003"  # (c) the annotation file is missing
GRAYSCALE = "ADE_train_00000004"  # (d) a mode L JPEG
PALETTE = "ADE_train_00000005"  # (d) a mode P PNG in place of the JPEG
LABELS_150_AND_255 = "ADE_train_00000006"  # valid: the largest class and the ignore value
VAL_GRAYSCALE = "ADE_val_00000002"  # (d) in validation
VAL_LABEL_151 = "ADE_val_00000003"  # (b) in validation: one above the largest class
GOOD_NON_RGB = (GRAYSCALE, PALETTE, LABELS_150_AND_255, VAL_GRAYSCALE)


def make_messy(root: Path) -> None:
    """make_demo_ade20k's 8 + 4 pairs, then 3 bad training pairs and 1 bad validation pair (see the stems above)."""
    make_demo_ade20k(str(root), num_train=8, num_validation=4, size=32, seed=0)
    train_images, train_labels = root / "images" / "training", root / "annotations" / "training"
    val_images, val_labels = root / "images" / "validation", root / "annotations" / "validation"

    annotation = load_image(train_labels / f"{WRONG_SIZE}.png")
    annotation.resize((annotation.width + 4, annotation.height), PILImage.NEAREST).save(
        train_labels / f"{WRONG_SIZE}.png"
    )

    def set_labels(path: Path, values: list[int]) -> None:
        array = np.array(load_image(path))
        array.flat[: len(values)] = values
        PILImage.fromarray(array).save(path)

    set_labels(train_labels / f"{LABEL_200}.png", [200])
    set_labels(train_labels / f"{LABELS_150_AND_255}.png", [150, 255, 150])
    set_labels(val_labels / f"{VAL_LABEL_151}.png", [151])
    (train_labels / f"{NO_ANNOTATION}.png").unlink()
    load_image(train_images / f"{GRAYSCALE}.jpg").convert("L").save(train_images / f"{GRAYSCALE}.jpg")
    load_image(train_images / f"{PALETTE}.jpg").convert("P").save(train_images / f"{PALETTE}.png")
    (train_images / f"{PALETTE}.jpg").unlink()
    load_image(val_images / f"{VAL_GRAYSCALE}.jpg").convert("L").save(val_images / f"{VAL_GRAYSCALE}.jpg")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    data_dir = Path(make_demo_ade20k(str(root / "ade20k"), num_train=8, num_validation=4, size=32, seed=0))
    make_messy(root / "messy")
    make_dbp_checkpoint(root / "dbp")
    make_dbp_checkpoint(root / "frozen_dbp", decorrelation_lr=0.0)
    make_plain_checkpoint(root / "plain")
    BertModel(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(root / "bert")
    make_parquet(data_dir, root / "parquet")
    # transformers' --image_processor_name: its normalisation is the one the run must use and save.
    ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(root / "vit_processor")
    (root / "no_annotation").mkdir()
    for split, seed in (("train", 0), ("validation", 1)):
        rng = np.random.default_rng(seed)
        images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
        Dataset.from_dict(
            {"image": images, "caption": [f"noise {i}" for i in range(4)]},
            features=Features({"image": Image(), "caption": Value("string")}),
        ).to_parquet(str(root / "no_annotation" / f"{split}.parquet"))
    return Inputs(
        data_dir,
        root / "messy",
        root / "dbp",
        root / "plain",
        root / "bert",
        root / "parquet",
        root / "no_annotation",
        root / "frozen_dbp",
        root / "vit_processor",
    )


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, Run]:
    """Every run of the module, two at a time:

    - "dbp": `--data_dir` with the DBP checkpoint (R folded);
    - "parquet": the same pairs from parquet files, `--image_column_name pixels --label_column_name segmentation`,
      `--max_train_samples 6 --max_eval_samples 3`;
    - "keep": `--keep_decorrelation`;
    - "keep_frozen": `--keep_decorrelation` from the checkpoint with decorrelation_lr 0;
    - "continued": from the UperNet checkpoint of "dbp" (started after it);
    - "plain": a transformers ViTMAEForPreTraining checkpoint, `--train_fraction 0.5`;
    - "messy": the messy data set (bad and non-RGB pairs);
    - "bert": a BERT checkpoint (fails);
    - "no_annotation": a parquet dataset without an annotation column (fails);
    - "fresh": no `--model_name_or_path`, cwd an empty folder (no pre-training demo output there);
    - "huge_crop": `--crop_size 4096` and a missing data folder (fails);
    - "bad_window": `--eval_window_size 30` (not a multiple of the patch) and a missing data folder (fails);
    - "unknown_checkpoint": a Hub name not in the (offline) cache (fails).
    """
    root = tmp_path_factory.mktemp("runs")
    futures: dict[str, Future] = {}

    def job(
        name: str, *args, after: str | None = None, cwd: Path | None = None, last: tuple = ()
    ) -> Callable[[], Run]:
        def call() -> Run:  # `last`: flags after TINY_FLAGS, which they override
            if after is not None:
                futures[after].result()
            output_dir = root / name / "out"
            result = run_script(
                *args,
                "--output_dir",
                output_dir,
                *TINY_FLAGS,
                *last,
                hf_home=root / name / "hf_home",
                cwd=cwd or REPO_ROOT,
            )
            return Run(result, output_dir)

        return call

    (root / "fresh_cwd").mkdir()
    data, dbp = ["--data_dir", inputs.data_dir], ["--model_name_or_path", inputs.dbp_checkpoint]
    jobs = {  # "dbp" first: "continued" waits for it
        "dbp": job("dbp", *data, *dbp),
        "keep": job("keep", *data, *dbp, "--keep_decorrelation"),
        # The weights of the DBP checkpoint, the configuration (decorrelation_lr 0) of the frozen one: --config_name.
        "keep_frozen": job(
            "keep_frozen",
            *data,
            *dbp,
            "--config_name",
            inputs.frozen_dbp_checkpoint,
            "--keep_decorrelation",
            "--learning_rate",
            0.1,
            "--weight_decay",
            0.5,
        ),
        "messy": job("messy", "--data_dir", inputs.messy_dir, *dbp),
        "parquet": job(
            "parquet",
            "--dataset_name",
            inputs.parquet_dir,
            "--image_column_name",
            "pixels",
            "--label_column_name",
            "segmentation",
            "--train_val_split",
            0.25,
            "--max_train_samples",
            6,
            "--max_eval_samples",
            3,
            *dbp,
        ),
        # transformers' flags of run_semantic_segmentation.py, as a command line written for it passes them.
        "plain": job(
            "plain",
            *data,
            "--model_name_or_path",
            inputs.plain_checkpoint,
            "--train_fraction",
            0.5,
            "--image_processor_name",
            inputs.vit_processor,
            "--cache_dir",
            root / "plain" / "cache",
            "--model_revision",
            "main",
            "--token",
            "hf_not_a_token",
            "--trust_remote_code",
        ),
        "bert": job("bert", *data, "--model_name_or_path", inputs.bert_checkpoint),
        "no_annotation": job("no_annotation", "--dataset_name", inputs.no_annotation_dir, *dbp),
        # A crop no memory holds (1,048,576 tokens at patch 4), with a data folder that does not exist: refused first.
        "huge_crop": job("huge_crop", "--data_dir", root / "no_such_data", *dbp, last=("--crop_size", 4096)),
        # A sliding window that is no multiple of the patch (4): refused, naming the flag, before the data.
        "bad_window": job("bad_window", "--data_dir", root / "no_such_data", *dbp, "--eval_window_size", 30),
        # Offline, a Hub name that is not cached (as `bert-base-uncased` was for a user): refused naming the flag.
        "unknown_checkpoint": job(
            "unknown_checkpoint", "--data_dir", root / "no_such_data", "--model_name_or_path", "someone/no-such-mae"
        ),
        "fresh": job("fresh", *data, cwd=root / "fresh_cwd"),
        # Sliding-window evaluation, drop path, a checkpoint per step.
        "continued": job(
            "continued",
            *data,
            "--model_name_or_path",
            root / "dbp" / "out",
            after="dbp",
            last=(
                "--eval_window_size",
                16,
                "--eval_window_stride",
                8,
                "--drop_path_rate",
                0.1,
                "--save_strategy",
                "steps",
                "--save_steps",
                1,
            ),
        ),
    }
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for name, call in jobs.items():
            futures[name] = pool.submit(call)
        return {name: future.result() for name, future in futures.items()}


# ----------------------------------------------------------------------------------------------------------------------
# 1. An ADE20K folder and a DBP checkpoint, R folded


def test_data_dir_run_writes_results_and_predictions(runs):
    """A --data_dir run exits 0 and writes finite metrics in [0, 1], a train loss, and predictions.png."""
    run = runs["dbp"]
    assert_succeeded(run)
    assert pair_counts(run.output) == (8, 4)
    assert_results(run.output_dir)
    assert read_json(run.output_dir / "trainer_state.json")["global_step"] == 2
    with PILImage.open(run.output_dir / "predictions.png") as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100
        image.verify()


def assert_pipeline_gives_the_scored_masks(run: Run, data_dir: Path) -> None:
    """pipeline("image-segmentation", model=the saved folder) gives, for each validation image, the masks the run's
    evaluation scored: the same class at every pixel of the image's own size as `predict_batch` (what the script's
    evaluation runs) with the saved image processor, whose loss is the eval_loss the run reported."""
    segmenter = pipeline("image-segmentation", model=str(run.output_dir))
    assert type(segmenter.image_processor) is hf_dbp.DBPSegmentationImageProcessor
    validation = load_ade20k_folder(str(data_dir))["validation"]
    transform = SegmentationTransform(32, train=False, image_processor=segmenter.image_processor)
    batch = segmentation_collate([transform(row["image"], row["annotation"]) for row in validation])
    predictions, loss = predict_batch(
        segmenter.model, segmenter.image_processor, batch["pixel_values"], batch["target_sizes"], batch["labels"]
    )
    assert float(loss) == pytest.approx(read_json(run.output_dir / "all_results.json")["eval_loss"], rel=1e-5)
    class_id = {name: i for i, name in segmenter.model.config.id2label.items()}
    sizes = set()
    for row, prediction in zip(validation, predictions, strict=True):
        width, height = row["image"].size
        sizes.add((height, width))
        segmented = np.full((height, width), -1)
        for segment in segmenter(row["image"]):
            mask = np.asarray(segment["mask"]) > 0
            assert (segmented[mask] == -1).all()  # the masks do not overlap
            segmented[mask] = class_id[segment["label"]]
        np.testing.assert_array_equal(segmented, prediction[:height, :width].numpy())
        assert (prediction[height:, :] == 255).all() and (prediction[:, width:] == 255).all()
    assert len(sizes) > 1  # images of several sizes, scored each at its own


def test_checkpoint_carries_its_image_processor_and_pipeline_gives_the_scored_masks(runs, inputs):
    """The UperNet folder holds preprocessor_config.json: AutoImageProcessor loads the evaluation transform (short
    side 32, the encoder's patch 4 as the divisor, ADE20K's label reduction) and pipeline() reproduces the
    evaluation, whole images at the annotations' resolution."""
    run = runs["dbp"]
    assert_succeeded(run)
    processor = AutoImageProcessor.from_pretrained(run.output_dir)
    assert type(processor) is hf_dbp.DBPSegmentationImageProcessor and processor.window_size is None
    assert processor.size["shortest_edge"] == 32 and processor.size_divisor == 4 and processor.do_reduce_labels
    assert "whole images" in run.output
    assert_pipeline_gives_the_scored_masks(run, inputs.data_dir)


def test_a_pushed_segmentation_folder_carries_its_processor_and_pipeline_runs_from_the_hub_copy(runs, tmp_path):
    """`hf-dbp push` of the result (push_folder, the Hub faked by a folder): the repo holds preprocessor_config.json
    with the model, its card names the repo id, and pipeline() runs on what was uploaded."""
    import shutil

    from test_cli_and_hub import FakeHubApi

    from hf_dbp.training.hub import push_folder

    run = runs["dbp"]
    assert_succeeded(run)
    folder = shutil.copytree(run.output_dir, tmp_path / "to_push")  # push_folder rewrites the card it pushes
    api = FakeHubApi(tmp_path / "hub")
    push_folder(str(folder), "me/upernet-dbp", api=api)
    uploaded = tmp_path / "hub" / "me" / "upernet-dbp"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in uploaded.iterdir()
    }
    assert 'from_pretrained("me/upernet-dbp")' in (uploaded / "README.md").read_text()
    masks = pipeline("image-segmentation", model=str(uploaded))(PILImage.new("RGB", (40, 32), (90, 120, 60)))
    assert masks and all(m["mask"].size == (40, 32) for m in masks)


def test_data_dir_run_saves_upernet_with_folded_backbone(runs, inputs):
    """The saved UperNet loads with AutoModelForSemanticSegmentation; its backbone is a ViTMAEDBPBackbone without R
    whose weights are the checkpoint's W R (not W), and its config has the 150 ADE20K classes."""
    run = runs["dbp"]
    assert_succeeded(run)
    assert "R folded into the weights" in run.output
    model = load_upernet(run.output_dir)
    assert type(model.backbone) is hf_dbp.ViTMAEDBPBackbone
    assert model.backbone.config.decorrelation_layers == []
    assert not r_matrices(model) and not model.backbone.decorrelation_modules()
    assert model.config.num_labels == 150 and len(model.config.id2label) == 150
    assert model.config.id2label[0] == "wall"
    assert model.config.backbone_config.hidden_size == TINY_MODEL["hidden_size"]

    pretrained = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(inputs.dbp_checkpoint)
    saved = model.backbone.vit.state_dict()
    pairs = {  # layer -> its R in the checkpoint
        "layers.1.mlp.fc1": "layers.1.mlp.fc1_decorrelation",
        "layers.2.attention.q_proj": "layers.2.attention.qkv_decorrelation",
        "embeddings.patch_embeddings.projection": "embeddings.patch_embeddings.projection_decorrelation",
    }
    for layer, decorrelation in pairs.items():
        w = pretrained.vit.get_submodule(layer).weight.detach()
        r = pretrained.vit.get_submodule(decorrelation).R.detach()
        folded = (w.reshape(w.shape[0], -1) @ r).reshape(w.shape)
        # Two AdamW steps at lr <= 1e-4 move each weight by about 2e-4 at most; W R - W is far larger.
        assert torch.allclose(saved[f"{layer}.weight"], folded, atol=1e-3), layer
        assert not torch.allclose(saved[f"{layer}.weight"], w, atol=1e-3), layer


def test_folded_run_logs_no_decorrelation_loss(runs):
    """With R folded nothing is decorrelated during fine-tuning: the training records have no decorrelation_loss."""
    run = runs["dbp"]
    assert_succeeded(run)
    records = training_records(run.output_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and "decorrelation_loss" not in r for r in records), records


# ----------------------------------------------------------------------------------------------------------------------
# 2. A parquet dataset through `datasets`


def test_parquet_dataset_with_custom_column_names(runs):
    """A local folder of parquet files loads through --dataset_name, with the image and annotation columns named by
    --image_column_name and --label_column_name; with no validation split, --train_val_split 0.25 holds out 3 of its
    12 pairs; --max_train/eval_samples cut the rest."""
    run = runs["parquet"]
    assert_succeeded(run)
    assert "No validation split: holding out 3 of the 12 training pairs (--train_val_split 0.25)" in run.output
    assert pair_counts(run.output) == (6, 3)
    assert_results(run.output_dir)
    assert (run.output_dir / "predictions.png").is_file()
    assert load_upernet(run.output_dir).config.num_labels == 150


# ----------------------------------------------------------------------------------------------------------------------
# 3. --keep_decorrelation


def test_keep_decorrelation_continues_dbp(runs, inputs):
    """With --keep_decorrelation the saved backbone keeps every R of the checkpoint, DBP moved them, and the
    training records carry the decorrelation loss."""
    run = runs["keep"]
    assert_succeeded(run)
    assert f"R kept on {NUM_R} layer groups, DBP continues" in run.output
    model = load_upernet(run.output_dir)
    assert type(model.backbone) is hf_dbp.ViTMAEDBPBackbone
    assert model.backbone.config.decorrelation_layers == list(hf_dbp.DECORRELATION_LAYER_KINDS)
    saved = r_matrices(model, prefix="backbone.")
    original = r_matrices(hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(inputs.dbp_checkpoint))
    assert len(original) == NUM_R and sorted(saved) == sorted(original)
    assert all(torch.isfinite(r).all() for r in saved.values())
    changes = {name: float((saved[name] - original[name]).abs().max()) for name in original}
    assert max(changes.values()) > 1e-6, changes  # DBP went on
    assert max(changes.values()) < 0.1, changes  # from the checkpoint's R, not from the identity
    records = training_records(run.output_dir)
    assert len(records) == 2
    for record in records:
        assert "decorrelation_loss" in record, record
        assert math.isfinite(record["decorrelation_loss"]) and record["decorrelation_loss"] > 0
    assert_results(run.output_dir)


def test_merging_an_upernet_with_r_kept_folds_it_and_keeps_the_processor(runs, tmp_path):
    """`hf-dbp merge` of the --keep_decorrelation UperNet: R folded into the encoder (no R left, the same logits),
    preprocessor_config.json carried over, so pipeline() runs on the merged folder too."""
    from hf_dbp.cli import main as hf_dbp_main

    run = runs["keep"]
    assert_succeeded(run)
    merged_dir = tmp_path / "merged"
    assert hf_dbp_main(["merge", str(run.output_dir), str(merged_dir)]) == 0
    merged, kept = load_upernet(merged_dir).eval(), load_upernet(run.output_dir).eval()
    assert not r_matrices(merged) and merged.backbone.config.decorrelation_layers == []
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values).logits, kept(pixel_values).logits, atol=1e-4, rtol=1e-4)
    assert type(AutoImageProcessor.from_pretrained(merged_dir)) is hf_dbp.DBPSegmentationImageProcessor
    masks = pipeline("image-segmentation", model=str(merged_dir))(PILImage.new("RGB", (40, 32), (90, 120, 60)))
    assert masks and all(m["mask"].size == (40, 32) for m in masks)


def test_keep_decorrelation_with_lr_zero_leaves_R_exactly(runs, inputs):
    """R is updated by the decorrelation rule only: with decorrelation_lr 0 in the configuration (from --config_name;
    the weights from --model_name_or_path, whose own config says 1e-3), fine-tuning (a large learning rate and weight
    decay, layer-wise lr decay) moves the encoder's weights and leaves every R bitwise."""
    run = runs["keep_frozen"]
    assert_succeeded(run)
    model = load_upernet(run.output_dir)
    assert model.backbone.config.decorrelation_lr == 0
    saved = r_matrices(model, prefix="backbone.")
    original_model = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(inputs.dbp_checkpoint)  # the weights' source
    original = r_matrices(original_model)
    assert len(original) == NUM_R and sorted(saved) == sorted(original)
    assert all(torch.equal(saved[name], original[name]) for name in original)
    fc1 = model.backbone.vit.layers[0].mlp.fc1.weight
    assert not torch.allclose(fc1, original_model.vit.layers[0].mlp.fc1.weight)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Continuing from a saved UperNet


def test_continues_from_saved_upernet(runs):
    """--model_name_or_path the UperNet saved by the "dbp" run continues from it: all its weights, heads included."""
    run = runs["continued"]
    assert_succeeded(run)
    assert f"Continued from the UperNet checkpoint {runs['dbp'].output_dir}" in run.output
    assert_results(run.output_dir)
    before = load_upernet(runs["dbp"].output_dir).state_dict()
    after = load_upernet(run.output_dir).state_dict()
    assert sorted(after) == sorted(before)
    for name in (
        "decode_head.classifier.weight",
        "auxiliary_head.classifier.weight",
        "backbone.vit.layers.3.mlp.fc2.weight",
    ):
        assert torch.allclose(after[name], before[name], atol=1e-3), name  # a fresh head would differ by far more


def test_sliding_window_evaluation_drop_path_and_a_processor_in_every_checkpoint(runs, inputs):
    """--eval_window_size 16 --eval_window_stride 8: the saved image processor slides 16 px windows (what the run
    scored, and what pipeline() runs); --drop_path_rate 0.1 is in the backbone's config and its blocks; each
    checkpoint-N folder carries the processor too."""
    run = runs["continued"]
    assert_succeeded(run)
    assert "sliding windows of 16 px, stride 8" in run.output
    for folder in (run.output_dir, run.output_dir / "checkpoint-1", run.output_dir / "checkpoint-2"):
        processor = AutoImageProcessor.from_pretrained(folder)
        assert type(processor) is hf_dbp.DBPSegmentationImageProcessor, folder
        assert (processor.window_size, processor.window_stride, processor.size_divisor) == (16, 8, 4), folder
        assert processor.size["shortest_edge"] == 32 and processor.do_reduce_labels, folder
    model = load_upernet(run.output_dir)
    assert model.config.backbone_config.drop_path_rate == 0.1
    rates = [block.dropout[1].drop_prob for block in model.backbone.vit.layers]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # BEiT's linear schedule over the 4 blocks
    assert_pipeline_gives_the_scored_masks(run, inputs.data_dir)


# ----------------------------------------------------------------------------------------------------------------------
# 5. A plain transformers ViTMAE checkpoint


def test_plain_vit_mae_checkpoint(runs):
    """A transformers ViTMAEForPreTraining checkpoint gives UperNet its encoder weights (a plain ViT backbone);
    --train_fraction 0.5 keeps 4 of the 8 training pairs."""
    run = runs["plain"]
    assert_succeeded(run)
    assert "the MAE encoder of" in run.output and "plain ViT encoder" in run.output
    assert pair_counts(run.output) == (4, 4)
    assert_results(run.output_dir)
    model = load_upernet(run.output_dir)
    assert not r_matrices(model)
    cls_token = model.backbone.vit.embeddings.cls_token
    assert torch.allclose(cls_token, torch.full_like(cls_token, PLAIN_CLS_TOKEN), atol=1e-3)


def test_transformers_flags_run_unchanged_and_the_named_processor_normalises(runs, inputs):
    """The command line of transformers' run_semantic_segmentation.py (--image_processor_name, --cache_dir,
    --model_revision, --token, --trust_remote_code) runs; the normalisation of --image_processor_name is the one
    saved (and used: the saved processor is the evaluation transform)."""
    run = runs["plain"]
    assert_succeeded(run)
    processor = AutoImageProcessor.from_pretrained(run.output_dir)
    assert list(processor.image_mean) == [0.5, 0.4, 0.3] and list(processor.image_std) == [0.2, 0.25, 0.3]
    assert f"normalisation of {inputs.vit_processor}'s ViTImageProcessor" in run.output


# ----------------------------------------------------------------------------------------------------------------------
# 6. Bad input


def skipped_lines(run: Run) -> list[str]:
    return log_lines(run.output, "skipping ")


def assert_skipped(run: Run, file_name: str, reason: str) -> None:
    lines = [line for line in skipped_lines(run) if file_name in line]
    assert lines, f"{file_name} not named in a 'skipping' line:\n" + "\n".join(skipped_lines(run))
    assert any(reason in line for line in lines), (reason, lines)


def test_bad_pairs_are_skipped_and_named_and_the_rest_trains(runs):
    """The 3 bad training pairs and the bad validation pair are dropped, and the run trains on the other 5 + 3.

    5 pairs in batches of 4 leave a last batch of one image, on which UperNet's BatchNorm cannot train: the script
    drops that batch (a different image each epoch), so the 2 steps run without error."""
    run = runs["messy"]
    assert_succeeded(run)
    assert pair_counts(run.output) == (5, 3)
    assert read_json(run.output_dir / "trainer_state.json")["global_step"] == 2
    assert "skipped 2 bad image/annotation pair(s) of 7" in run.output  # training: 7 pairs found, (c) had no partner
    assert "skipped 1 bad image/annotation pair(s) of 4" in run.output
    assert_results(run.output_dir)
    assert (run.output_dir / "model.safetensors").is_file()


def test_annotation_of_another_size_is_skipped(runs):
    run = runs["messy"]
    assert_succeeded(run)
    assert_skipped(run, f"{WRONG_SIZE}.png", "but its image is")
    assert re.search(rf"{WRONG_SIZE}\.png: annotation is (\d+)x\d+ but its image is (\d+)x", run.output)


def test_label_above_the_classes_is_skipped(runs):
    run = runs["messy"]
    assert_succeeded(run)
    assert_skipped(run, f"{LABEL_200}.png", "label value(s) 200")
    assert_skipped(run, f"{VAL_LABEL_151}.png", "label value(s) 151")
    # 150 (the largest class) and 255 (ignored) are valid
    assert not [line for line in skipped_lines(run) if LABELS_150_AND_255 in line]


def test_missing_annotation_is_skipped(runs):
    run = runs["messy"]
    assert_succeeded(run)
    assert_skipped(run, f"{NO_ANNOTATION}.jpg", "has no annotation")


def test_grayscale_and_palette_images_train(runs):
    """A grayscale JPEG and a palette PNG (training), a grayscale JPEG (validation): not skipped, simply used."""
    run = runs["messy"]
    assert_succeeded(run)
    skipped = "\n".join(skipped_lines(run))
    assert not [stem for stem in GOOD_NON_RGB if stem in skipped], skipped
    assert len(training_records(run.output_dir)) == 2


def test_checkpoint_of_another_model_type_is_refused(runs):
    """A BERT checkpoint stops the run before training, with a message naming its type 'bert'."""
    error = assert_failed_before_training(runs["bert"])
    assert "'bert'" in error, error


def test_a_crop_that_cannot_fit_memory_is_refused_through_the_script_before_the_data(runs):
    """The user's path of defect 1: `--crop_size 4096` around a patch-4 encoder stops at once with one line that
    names the crop, the tokens, the GiB and the default, before the (here missing) data folder is looked at."""
    error = assert_failed_before_training(runs["huge_crop"])
    assert "--crop_size 4096" in error and "1,048,576 tokens" in error and "GiB" in error, error
    assert "default is 32 patches, 128 px here" in error, error
    assert "no_such_data" not in runs["huge_crop"].output


def test_a_sliding_window_off_the_patch_grid_is_refused_naming_the_flag(runs):
    error = assert_failed_before_training(runs["bad_window"])
    assert "--eval_window_size 30" in error and "patch (4 px)" in error, error
    assert "no_such_data" not in runs["bad_window"].output


def test_a_checkpoint_neither_here_nor_on_the_hub_is_named_with_its_flag(runs):
    error = assert_failed_before_training(runs["unknown_checkpoint"])
    assert "--model_name_or_path someone/no-such-mae: no such folder here" in error and "the Hub" in error, error


def test_dataset_without_annotation_column_fails_with_its_columns(runs):
    """A dataset without the annotation column stops before training, with an error listing its columns."""
    error = assert_failed_before_training(runs["no_annotation"])
    assert "'annotation'" in error and "'image'" in error and "'caption'" in error, error


# ----------------------------------------------------------------------------------------------------------------------
# 7. No checkpoint at all


def test_without_checkpoint_starts_from_a_fresh_encoder(runs):
    """With no --model_name_or_path and no outputs/mae-dbp-demo in the cwd, the log says a fresh encoder is used;
    nothing is written into the cwd."""
    run = runs["fresh"]
    assert_succeeded(run)
    assert "starting from a fresh small encoder" in run.output
    assert "Loaded a fresh (untrained) encoder into UperNet's backbone" in run.output
    assert "using the pre-training demo's checkpoint" not in run.output
    assert_results(run.output_dir)
    assert read_json(run.output_dir / "config.json")["backbone_config"]["hidden_size"] == 96  # the script's fresh one
    cwd = run.output_dir.parent.parent / "fresh_cwd"
    assert not list(cwd.iterdir()), list(cwd.iterdir())


def _segmentation_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_segmentation", SEGMENTATION_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_crop_that_cannot_fit_memory_is_refused_before_the_data_naming_the_numbers(tmp_path):
    """What the out-of-memory killer did silently at 23.6 GB: 512 px around a patch-4 encoder, 16,384 tokens per
    image. The default crop (32 patches) fits; 512 px is refused with the tokens, the GiB and the way out."""
    script = _segmentation_module()
    encoder = ViTMAEConfig(
        image_size=32, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384
    )
    args = script.SegmentationTrainingArguments(
        tmp_path, per_device_train_batch_size=8, report_to="none", use_cpu=True
    )
    script.check_fits_in_memory(encoder, script.CROP_PATCHES * encoder.patch_size, args)  # 128 px: fits
    with pytest.raises(ValueError) as refused:
        script.check_fits_in_memory(encoder, 512, args)
    message = str(refused.value)
    assert "--crop_size 512" in message and "16,384 tokens" in message and "GiB" in message and "128 px" in message
    assert script.DataTrainingArguments().crop_size is None  # sized from the encoder unless asked
