"""End-to-end tests of examples/run_mae_dbp.py.

Each test runs the script for real, in a subprocess from the repository root, on a dozen tiny images and a tiny
ViT-MAE (3 optimizer steps), offline. Runs that several tests inspect are module-scoped fixtures, so each runs once,
and those fixtures start their runs side by side, one per CPU core: most of a run's time is its imports, on one core.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import offline_env, randomise_R, read_json, training_records
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from safetensors import safe_open
from transformers import BertConfig, BertModel, ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

import hf_dbp
from hf_dbp.tasks.image_data import fixed_mask_noise

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "run_mae_dbp.py"

TINY_MODEL = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "decoder_hidden_size": 16,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 32,
}
TINY_OVERRIDES = ",".join(f"{key}={value}" for key, value in TINY_MODEL.items())
# Three optimizer steps of 4 images, a log record after each, nothing saved but the final model.
TINY_RUN = {
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_steps": 3,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
}


def as_flags(options: dict) -> list[str]:
    return [str(item) for key, value in options.items() for item in (f"--{key}", value)]


TINY_FLAGS = as_flags({"config_overrides": TINY_OVERRIDES, **TINY_RUN})


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def run_script(*args, hf_home: Path, accelerate: bool = False, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run the script (optionally under `accelerate launch` on one CPU process, `--quiet`: without the launcher's
    own traceback when the script fails); stdout and stderr merged."""
    env = offline_env(hf_home)
    launcher = [sys.executable]
    if accelerate:
        launcher += [
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--cpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *(["--quiet"] if quiet else []),
        ]
    return subprocess.run(
        [*launcher, str(SCRIPT), *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"the script failed (exit {result.returncode}):\n{result.stdout[-6000:]}"


def assert_failed_before_training(run: Run) -> str:
    """The run exited non-zero without training, with one error line and no traceback; returns that line."""
    assert run.result.returncode == 1, f"the script should have failed:\n{run.output[-3000:]}"
    assert not (run.output_dir / "trainer_state.json").exists()
    assert not (run.output_dir / "model.safetensors").exists()
    assert "Traceback" not in run.output, run.output[-3000:]
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("run_mae_dbp.py: error: "), run.output[-3000:]
    return last


def write_images(folder: Path, count: int, mode: str = "RGB", suffix: str = ".png", seed: int = 0) -> list[Path]:
    """`count` square noise images of 20 to 40 px in PIL mode `mode` (RGB, RGBA, L or P)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = int(rng.integers(20, 41))
        channels = 4 if mode == "RGBA" else 3  # RGBA with a varying alpha channel
        image = PILImage.fromarray(rng.integers(0, 256, (size, size, channels), dtype=np.uint8))
        paths.append(folder / f"{mode.lower()}_{i}{suffix}")
        image.convert(mode).save(paths[-1])
    return paths


def noise_images(count: int, seed: int = 0) -> list[PILImage.Image]:
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(count)]


def image_counts(output: str) -> tuple[int, int]:
    """(training, validation) image counts from the script's 'pre-training ... on N images (M for validation)' log."""
    match = re.search(r"on (\d+) images \((\d+) for validation\)", output)
    assert match, f"no image count in the log:\n{output[-3000:]}"
    return int(match.group(1)), int(match.group(2))


def assert_finite_losses(output_dir: Path, keys=("train_loss", "eval_loss")) -> None:
    results = read_json(output_dir / "all_results.json")
    for key in keys:
        assert key in results, f"{key} missing from all_results.json: {results}"
        assert isinstance(results[key], float) and math.isfinite(results[key]), results


def safetensors_keys(output_dir: Path) -> list[str]:
    with safe_open(str(output_dir / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


# ----------------------------------------------------------------------------------------------------------------------
# Runs shared by several tests


@dataclass
class Run:
    """A finished run of the script, with the training images it was given that can or cannot be decoded."""

    result: subprocess.CompletedProcess
    output_dir: Path
    readable: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.result.stdout


def run_concurrently(
    runs: dict[str, Callable[[], subprocess.CompletedProcess]],
) -> dict[str, subprocess.CompletedProcess]:
    """Call each `run_script` partial, as many at a time as there are CPU cores."""
    with ThreadPoolExecutor(max_workers=min(len(runs), os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The runs that one test each inspects (see the `prepare_*` functions beside those tests), started together, as
    many at a time as there are cores: each runs on one. name -> (the finished process, its folder)."""
    base = tmp_path_factory.mktemp("standalone")
    preparations = {
        "parquet": prepare_parquet,
        "bp_baseline": prepare_bp_baseline,
        "plain_checkpoint": prepare_plain_checkpoint,
        "lr_zero": prepare_lr_zero,
        "block_diagonal": prepare_block_diagonal,
        "config_json": partial(prepare_config_file, file_format="json"),
        "config_yaml": partial(prepare_config_file, file_format="yaml"),
    }
    calls = {}
    for name, prepare in preparations.items():
        (base / name).mkdir()
        args, kwargs = prepare(base / name)
        calls[name] = partial(run_script, *args, hf_home=base / name / "hf_home", **kwargs)
    results = run_concurrently(calls)
    return {name: (results[name], base / name) for name in preparations}


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory) -> dict[str, Run]:
    """Two DBP runs from scratch on a training and a validation image folder:

    - "clean": 12 RGB training images, 4 validation images, evaluated after step 3 and again at the end;
    - "messy": no RGB image at all: grayscale (L), RGBA and palette (P, PNG and GIF) images, plus a .jpg of random
      bytes and a truncated JPEG in the training folder.
    """
    root = tmp_path_factory.mktemp("folder_runs")
    write_images(root / "clean" / "train", 12)
    write_images(root / "clean" / "validation", 4, seed=1)

    messy_train = root / "messy" / "train"
    readable = [
        *write_images(messy_train, 4, mode="L"),
        *write_images(messy_train, 4, mode="RGBA", seed=1),
        *write_images(messy_train, 3, mode="P", seed=2),
        *write_images(messy_train, 1, mode="P", suffix=".gif", seed=3),
    ]
    corrupt, truncated = messy_train / "corrupt.jpg", messy_train / "truncated.jpg"
    corrupt.write_bytes(np.random.default_rng(4).bytes(600))
    jpeg = write_images(root / "messy" / "jpeg", 1, suffix=".jpg", seed=5)[0].read_bytes()
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    for seed, mode in enumerate(("L", "RGBA", "P")):
        write_images(root / "messy" / "validation", 1, mode=mode, seed=10 + seed)

    def run(name, *extra):
        folder = root / name
        return partial(
            run_script,
            "--train_dir",
            folder / "train",
            "--validation_dir",
            folder / "validation",
            "--output_dir",
            folder / "out",
            *TINY_FLAGS,
            *extra,
            hf_home=folder / "hf_home",
        )

    # "clean" also evaluates after its last step, so that two evaluations of the same weights can be compared.
    clean = run("clean", "--eval_strategy", "steps", "--eval_steps", "3")
    results = run_concurrently({"clean": clean, "messy": run("messy")})
    return {
        "clean": Run(results["clean"], root / "clean" / "out"),
        "messy": Run(results["messy"], root / "messy" / "out", readable, [corrupt, truncated]),
    }


@pytest.fixture(scope="module")
def early_exits(tmp_path_factory) -> dict[str, Run]:
    """The runs that stop before training:

    - "help": `--help`;
    - "no_image_column": a parquet dataset with only "text" and "label" columns;
    - "wrong_image_column_name": an image folder with `--image_column_name nope`;
    - "bert_before_data": `--model_name_or_path` a tiny BERT checkpoint (and a missing data folder: never read);
    - "missing_train_dir", "empty_train_dir", "bad_decorrelation_lr": the data or a DBP flag wrong (the last under
      `accelerate launch --quiet`, as a user would start it).
    """
    root = tmp_path_factory.mktemp("early_exits")
    text_data = root / "text_data"
    text_data.mkdir()
    Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}).to_parquet(
        str(text_data / "train.parquet")
    )
    write_images(root / "images", 4)
    bert_config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(bert_config).save_pretrained(root / "bert")
    args = {
        "help": ["--help"],
        "no_image_column": ["--dataset_name", text_data],
        "wrong_image_column_name": ["--train_dir", root / "images", "--image_column_name", "nope"],
        "missing_train_dir": ["--train_dir", root / "no_such_images"],
        "empty_train_dir": ["--train_dir", root / "text_data"],  # a folder, but not one image in it
        # A bad DBP flag (or checkpoint) with data that would fail too: the flag's error comes first, before the data.
        "bad_decorrelation_lr": ["--train_dir", root / "no_such_images", "--decorrelation_lr", "-1"],
        "bad_block_size": ["--train_dir", root / "no_such_images", "--decorrelation_block_size", "0"],
        "bert_before_data": ["--train_dir", root / "no_such_images", "--model_name_or_path", root / "bert"],
        # Offline, a name that is neither a folder here nor a cached Hub model: one line naming the flag and the name.
        "unknown_checkpoint": ["--train_dir", root / "no_such_images", "--model_name_or_path", "someone/no-such-mae"],
    }
    launch = {"bad_decorrelation_lr": {"accelerate": True, "quiet": True}}
    results = run_concurrently(
        {
            name: partial(
                run_script,
                *name_args,
                "--output_dir",
                root / name / "out",
                *TINY_FLAGS,
                hf_home=root / name / "hf_home",
                **launch.get(name, {}),
            )
            for name, name_args in args.items()
        }
    )
    return {name: Run(results[name], root / name / "out") for name in args}


# ----------------------------------------------------------------------------------------------------------------------
# 1. Image folders


def test_help_lists_the_options(early_exits):
    """`--help` works (argparse formats every help string with %) and lists the script's and Trainer's options."""
    run = early_exits["help"]
    assert_succeeded(run.result)
    for option in (
        "--train_dir",
        "--dataset_name",
        "--bp_baseline",
        "--decorrelation_layers",
        "--max_train_samples",
        "--base_learning_rate",
        "--per_device_train_batch_size",
    ):
        assert option in run.output


def test_image_folder_run_writes_model_and_results(folder_runs):
    """An image-folder run exits 0 and writes a DBP checkpoint (the --config_overrides architecture) and finite
    train and eval losses."""
    run = folder_runs["clean"]
    assert_succeeded(run.result)
    for name in ("model.safetensors", "config.json", "all_results.json", "trainer_state.json", "training_curves.png"):
        assert (run.output_dir / name).is_file(), f"{name} missing: {sorted(p.name for p in run.output_dir.iterdir())}"
    config = read_json(run.output_dir / "config.json")
    assert config["model_type"] == "vit_mae_dbp"
    assert {key: config[key] for key in TINY_MODEL} == TINY_MODEL
    assert_finite_losses(run.output_dir)
    assert image_counts(run.output) == (12, 4)


def test_image_folder_run_logs_decorrelation_loss(folder_runs):
    """trainer_state.json records 3 steps, each log record with the MAE loss and the decorrelation loss."""
    run = folder_runs["clean"]
    assert_succeeded(run.result)
    assert read_json(run.output_dir / "trainer_state.json")["global_step"] == 3
    records = training_records(run.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert "decorrelation_loss" in record, record
        assert math.isfinite(record["loss"]) and math.isfinite(record["decorrelation_loss"])
        assert record["decorrelation_loss"] > 0


def test_validation_masks_are_the_same_at_every_evaluation(folder_runs):
    """The evaluation after the last step and the final one see the same weights: with fixed validation masks they
    give the same loss (ViTMAE's own random masks would not)."""
    run = folder_runs["clean"]
    assert_succeeded(run.result)
    history = read_json(run.output_dir / "trainer_state.json")["log_history"]
    during = [r["eval_loss"] for r in history if "eval_loss" in r and r["step"] == 3]
    assert len(during) >= 1
    assert during[0] == pytest.approx(read_json(run.output_dir / "all_results.json")["eval_loss"], rel=1e-6)


def test_fixed_mask_noise_depends_on_seed_and_image_only():
    first = fixed_mask_noise(0, 5, 16)
    assert first.shape == (16,) and first.dtype == np.float32
    np.testing.assert_array_equal(first, fixed_mask_noise(0, 5, 16))
    assert not np.array_equal(first, fixed_mask_noise(0, 6, 16))
    assert not np.array_equal(first, fixed_mask_noise(1, 5, 16))


def test_image_folder_run_plots_training_curves(folder_runs):
    """training_curves.png is a real PNG image."""
    run = folder_runs["clean"]
    assert_succeeded(run.result)
    with PILImage.open(run.output_dir / "training_curves.png") as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100
        image.verify()


def test_image_folder_checkpoint_loads_with_updated_decorrelation(folder_runs):
    """The checkpoint loads as ViTMAEDBPForPreTraining, and training moved every R away from its initial identity."""
    run = folder_runs["clean"]
    assert_succeeded(run.result)
    model = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(run.output_dir)
    assert model.config.decorrelation_layers == list(hf_dbp.DECORRELATION_LAYER_KINDS)
    r_qkv = model.vit.layers[0].attention.qkv_decorrelation.R
    assert not torch.allclose(r_qkv, torch.eye(r_qkv.shape[0]), atol=1e-6)
    modules = model.decorrelation_modules()
    assert len(modules) == 1 + 4 * TINY_MODEL["num_hidden_layers"]  # patch embedding, then qkv, o_proj, fc1, fc2
    for module in modules:
        assert torch.isfinite(module.R).all()
        assert not torch.allclose(module.R, torch.eye(module.R.shape[0]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# 2. A `datasets` dataset


def prepare_parquet(root: Path) -> tuple[list, dict]:
    data_dir = root / "data"
    data_dir.mkdir()
    features = Features({"img": Image(), "caption": Value("string")})
    dataset = Dataset.from_dict(
        {"img": noise_images(12), "caption": [f"noise {i}" for i in range(12)]}, features=features
    )
    dataset.to_parquet(str(data_dir / "train.parquet"))
    return ["--dataset_name", data_dir, "--train_val_split", 0.25, "--output_dir", root / "out", *TINY_FLAGS], {}


def test_parquet_dataset_with_img_column_and_train_val_split(standalone):
    """A folder of parquet files trains through --dataset_name: the 'img' column is found, and --train_val_split
    holds out a quarter of the 12 rows for validation."""
    result, root = standalone["parquet"]
    output_dir = root / "out"
    assert_succeeded(result)
    assert image_counts(result.stdout) == (9, 3)
    assert_finite_losses(output_dir)
    assert read_json(output_dir / "config.json")["model_type"] == "vit_mae_dbp"


# ----------------------------------------------------------------------------------------------------------------------
# 3. The BP baseline


def prepare_bp_baseline(root: Path) -> tuple[list, dict]:
    write_images(root / "train", 12)
    return ["--train_dir", root / "train", "--bp_baseline", "--output_dir", root / "out", *TINY_FLAGS], {}


def test_bp_baseline_saves_a_plain_vit_mae(standalone):
    """--bp_baseline trains and saves a plain transformers ViTMAE (no R), still logging the decorrelation loss."""
    result, root = standalone["bp_baseline"]
    output_dir = root / "out"
    assert_succeeded(result)
    assert read_json(output_dir / "config.json")["model_type"] == "vit_mae"
    assert not [key for key in safetensors_keys(output_dir) if "decorrelation" in key]
    model, info = ViTMAEForPreTraining.from_pretrained(output_dir, output_loading_info=True)
    assert type(model) is ViTMAEForPreTraining
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    records = training_records(output_dir)
    assert len(records) == 3 and all("decorrelation_loss" in r for r in records), records
    assert_finite_losses(output_dir)  # the default train_val_split gives a validation split


# ----------------------------------------------------------------------------------------------------------------------
# 4. Bad inputs


def test_unreadable_images_are_skipped_and_named(folder_runs):
    """A .jpg of random bytes and a truncated JPEG are dropped before training: each is named, and counted."""
    run = folder_runs["messy"]
    assert_succeeded(run.result)
    for path in run.unreadable:
        assert path.name in run.output, f"{path.name} not named in the output:\n{run.output[-4000:]}"
    folder_size = len(run.readable) + len(run.unreadable)
    assert re.search(rf"skipped 2 unreadable image\S* of {folder_size}\b", run.output), run.output[-4000:]
    assert image_counts(run.output) == (len(run.readable), 3)
    assert (run.output_dir / "model.safetensors").is_file()


def test_grayscale_rgba_and_palette_images_train(folder_runs):
    """Grayscale (L), RGBA and palette (P, PNG and GIF) images, the only readable ones, are all trained on."""
    run = folder_runs["messy"]
    assert_succeeded(run.result)
    skipped = "\n".join(line for line in run.output.splitlines() if "skipping unreadable image" in line)
    assert not [path.name for path in run.readable if path.name in skipped], skipped
    assert image_counts(run.output) == (len(run.readable), 3)
    assert len(training_records(run.output_dir)) == 3
    assert_finite_losses(run.output_dir)


def test_dataset_without_image_column_fails_before_training(early_exits):
    """A dataset with only text columns stops with an error that lists its columns, before any training."""
    error = assert_failed_before_training(early_exits["no_image_column"])
    assert "'text'" in error and "'label'" in error, error
    assert "--image_column_name" in error


def test_wrong_image_column_name_fails_before_training(early_exits):
    """--image_column_name naming no column of an image folder stops with an error listing the real columns."""
    error = assert_failed_before_training(early_exits["wrong_image_column_name"])
    assert "'nope'" in error and "'image'" in error, error


def test_checkpoint_of_another_model_type_is_refused(early_exits):
    """--model_name_or_path pointing to a BERT checkpoint stops with an error naming the type 'bert'."""
    error = assert_failed_before_training(early_exits["bert_before_data"])
    assert "'bert'" in error, error


@pytest.mark.parametrize(
    "name, words",
    [
        ("missing_train_dir", ("--train_dir", "no_such_images", "no such folder")),
        ("empty_train_dir", ("--train_dir", "text_data", "holds no image file", "1 files", ".png")),
    ],
)
def test_a_missing_or_imageless_train_dir_is_named_with_what_was_looked_for(early_exits, name, words):
    error = assert_failed_before_training(early_exits[name])
    assert all(word in error for word in words), error
    assert "corresponds to no data" not in early_exits[name].output


@pytest.mark.parametrize(
    "name, words",
    [
        ("bad_decorrelation_lr", ("decorrelation_lr", "-1")),
        ("bad_block_size", ("decorrelation_block_size must be an integer >= 1", "0")),
        ("bert_before_data", ("'bert'",)),
        ("unknown_checkpoint", ("--model_name_or_path someone/no-such-mae", "no such folder here", "the Hub")),
    ],
)
def test_bad_dbp_settings_and_checkpoints_are_refused_before_the_data_is_read(early_exits, name, words):
    error = assert_failed_before_training(early_exits[name])
    assert all(word in error for word in words), error
    assert "no_such_images" not in early_exits[name].output  # the data (a missing folder here) was never touched


# ----------------------------------------------------------------------------------------------------------------------
# 5. Starting from a plain ViTMAE checkpoint


def prepare_plain_checkpoint(root: Path) -> tuple[list, dict]:
    torch.manual_seed(0)
    plain = ViTMAEForPreTraining(ViTMAEConfig(**TINY_MODEL))
    with torch.no_grad():
        plain.vit.embeddings.cls_token.fill_(0.5)  # a value no initialisation gives
    plain.save_pretrained(root / "plain")
    ViTImageProcessor(image_mean=[0.4, 0.4, 0.4], image_std=[0.3, 0.3, 0.3]).save_pretrained(root / "plain")
    write_images(root / "train", 12)
    # No --config_overrides: the architecture comes from the checkpoint.
    return [
        "--train_dir",
        root / "train",
        "--model_name_or_path",
        root / "plain",
        "--output_dir",
        root / "out",
        *as_flags(TINY_RUN),
    ], {}


def test_dbp_training_starts_from_a_plain_vit_mae_checkpoint(standalone):
    """A plain transformers ViTMAE checkpoint is loaded into the DBP model (its weights, not a fresh init) and
    trained with DBP; the normalisation of the checkpoint's own image processor (facebook/vit-mae-base carries one)
    is the run's, and the processor saved with the result."""
    result, root = standalone["plain_checkpoint"]
    output_dir = root / "out"
    plain = ViTMAEForPreTraining.from_pretrained(root / "plain")
    assert_succeeded(result)
    assert read_json(output_dir / "config.json")["model_type"] == "vit_mae_dbp"
    assert f"normalised with the mean and std of {root / 'plain'}'s ViTImageProcessor" in result.stdout
    processor = read_json(output_dir / "preprocessor_config.json")
    assert processor["image_mean"] == [0.4, 0.4, 0.4] and processor["image_std"] == [0.3, 0.3, 0.3]
    model = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(output_dir)
    assert model.config.hidden_size == TINY_MODEL["hidden_size"]
    # 3 steps at lr 1.5e-4 * 4 / 256 move each weight by about 1e-5: the checkpoint's values are still there.
    assert torch.allclose(
        model.vit.embeddings.cls_token, torch.full_like(model.vit.embeddings.cls_token, 0.5), atol=1e-3
    )
    assert torch.allclose(model.vit.layers[1].mlp.fc1.weight, plain.vit.layers[1].mlp.fc1.weight, atol=1e-3)
    r_qkv = model.vit.layers[0].attention.qkv_decorrelation.R
    assert not torch.allclose(r_qkv, torch.eye(r_qkv.shape[0]), atol=1e-6)
    assert all("decorrelation_loss" in r for r in training_records(output_dir))


def prepare_lr_zero(root: Path) -> tuple[list, dict]:
    torch.manual_seed(0)
    original = hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_MODEL))
    randomise_R(original, scale=0.1)
    original.save_pretrained(root / "dbp")
    write_images(root / "train", 12)
    # With transformers' run_mae.py flags too: --image_processor_name (whose normalisation is used), --trust_remote_code.
    ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(root / "processor")
    return [
        "--train_dir",
        root / "train",
        "--model_name_or_path",
        root / "dbp",
        "--decorrelation_lr",
        0,
        "--weight_decay",
        0.5,
        "--base_learning_rate",
        0.1,
        "--image_processor_name",
        root / "processor",
        "--trust_remote_code",
        "--output_dir",
        root / "out",
        *as_flags(TINY_RUN),
    ], {}


def prepare_block_diagonal(root: Path) -> tuple[list, dict]:
    torch.manual_seed(0)
    config = hf_dbp.ViTMAEDBPConfig(**TINY_MODEL, decorrelation_block_size=8)
    hf_dbp.ViTMAEDBPForPreTraining(config).save_pretrained(root / "blocks")
    write_images(root / "train", 12)
    # Continued without a block flag: the checkpoint's own blocks are kept (the 'paper' preset does not undo them).
    return [
        "--train_dir",
        root / "train",
        "--model_name_or_path",
        root / "blocks",
        "--output_dir",
        root / "out",
        *as_flags(TINY_RUN),
    ], {}


def test_a_block_diagonal_checkpoint_continues_with_its_own_blocks(standalone):
    result, root = standalone["block_diagonal"]
    assert_succeeded(result)
    model = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(root / "out")
    assert model.config.decorrelation["block_size"] == 8
    for module in model.decorrelation_modules():
        assert module.R.dim() == 3 and module.R.shape[1:] == (8, 8)
        assert not module.is_identity()  # trained
    # The script's flags: the preset's block size, the flag's over it, and none (the checkpoint's) for 'paper'.
    spec = importlib.util.spec_from_file_location("run_mae_dbp", SCRIPT)
    script = sys.modules["run_mae_dbp"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(script)
    assert script.DBPArguments(decorrelation_preset="fast").config_values()["decorrelation_block_size"] == 384
    assert script.DBPArguments(decorrelation_preset="fast", decorrelation_block_size=16).block_size() == 16
    assert "decorrelation_block_size" not in script.DBPArguments().config_values()


def test_dbp_checkpoint_trained_with_decorrelation_lr_zero_keeps_R_exactly(standalone):
    """R is updated by the decorrelation rule only: continuing a DBP checkpoint (R far from I, loaded by
    from_pretrained, which used to hand R back trainable) with --decorrelation_lr 0 trains the weights and leaves every
    R bitwise as it was, also with a weight decay that would shrink any parameter in the optimizer."""
    result, root = standalone["lr_zero"]
    output_dir = root / "out"
    original = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(root / "dbp")
    assert_succeeded(result)
    assert read_json(output_dir / "preprocessor_config.json")["image_mean"] == [0.5, 0.4, 0.3]
    trained = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(output_dir)
    assert trained.config.decorrelation_lr == 0
    after, before = trained.state_dict(), original.state_dict()
    matrices = [k for k in before if k.endswith("_decorrelation.R")]
    assert len(matrices) == 9
    assert all(torch.equal(after[k], before[k]) for k in matrices)
    assert not torch.allclose(after["vit.layers.0.mlp.fc1.weight"], before["vit.layers.0.mlp.fc1.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# 6. A JSON or YAML file as the only argument (the YAML one under `accelerate launch`)


def prepare_config_file(root: Path, file_format: str) -> tuple[list, dict]:
    write_images(root / "train", 12)
    fields = {
        "train_dir": str(root / "train"),
        "output_dir": str(root / "out"),
        "config_overrides": TINY_OVERRIDES,
        "decorrelation_lr": 0.002,
        "decorrelation_layers": ["qkv", "fc1"],
        **TINY_RUN,
    }
    config_file = root / f"run.{file_format}"
    config_file.write_text(json.dumps(fields) if file_format == "json" else yaml.safe_dump(fields))
    return [config_file], {"accelerate": file_format != "json"}


@pytest.mark.parametrize("file_format", ["json", "yaml-under-accelerate-launch"])
def test_config_file_as_only_argument(standalone, file_format):
    """A JSON file (plain Python) or a YAML file (through `accelerate launch --num_processes 1 --cpu`) holding the
    dataclass fields as keys configures the run, lists included."""
    result, root = standalone[f"config_{file_format.split('-')[0]}"]
    output_dir = root / "out"
    assert_succeeded(result)
    config = hf_dbp.ViTMAEDBPConfig.from_pretrained(output_dir)
    assert config.decorrelation_lr == 0.002
    assert config.decorrelation_layers == ["qkv", "fc1"]
    assert config.hidden_size == TINY_MODEL["hidden_size"]
    model = hf_dbp.ViTMAEDBPForPreTraining.from_pretrained(output_dir)
    r_names = sorted(name for name, _ in model.named_parameters() if name.endswith("_decorrelation.R"))
    assert r_names == [
        f"vit.layers.{i}.{kind}_decorrelation.R" for i in range(2) for kind in ("attention.qkv", "mlp.fc1")
    ]
    assert len(training_records(output_dir)) == 3
    assert_finite_losses(output_dir)


def test_a_settings_file_plus_flags_says_the_file_must_be_the_only_argument(tmp_path, monkeypatch, capsys):
    from dataclasses import dataclass

    from hf_dbp.tasks.scripts import parse_script_arguments

    @dataclass
    class Settings:
        output_dir: str = "out"
        max_steps: int = -1

    (tmp_path / "run.yaml").write_text("output_dir: out\n")
    monkeypatch.setattr(sys, "argv", ["run_mae_dbp.py", str(tmp_path / "run.yaml"), "--max_steps", "2"])
    with pytest.raises(SystemExit):
        parse_script_arguments([Settings], {})
    error = capsys.readouterr().err
    assert "run.yaml is a settings file" in error and "only argument" in error and "--max_steps 2" in error, error
    monkeypatch.setattr(sys, "argv", ["run_mae_dbp.py", str(tmp_path / "run.yaml")])
    assert parse_script_arguments([Settings], {})[0].output_dir == "out"


def test_run_main_prints_the_users_mistakes_as_one_line_and_keeps_the_runs_errors_traceback(monkeypatch, capsys):
    """Before any training a ValueError is one line `<script>: error: ...` and exit status 1; once a DBPTrainer began
    to train (saving, the card, the push come after) the same error keeps its traceback, as with
    HF_DBP_FULL_TRACEBACK=1."""
    from hf_dbp.tasks.scripts import TrainingBegan, run_main

    def mistake():
        raise ValueError("--decorrelation_lr -1: must be >= 0")

    monkeypatch.setattr(sys, "argv", ["run_mae_dbp.py"])
    monkeypatch.setattr(TrainingBegan, "began", False)
    with pytest.raises(SystemExit) as exited:
        run_main(mistake)
    assert exited.value.code == 1
    assert capsys.readouterr().err == "run_mae_dbp.py: error: --decorrelation_lr -1: must be >= 0\n"
    monkeypatch.setenv("HF_DBP_FULL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="must be >= 0"):
        run_main(mistake)
    monkeypatch.delenv("HF_DBP_FULL_TRACEBACK")
    monkeypatch.setattr(TrainingBegan, "began", True)
    with pytest.raises(ValueError, match="must be >= 0"):
        run_main(mistake)
