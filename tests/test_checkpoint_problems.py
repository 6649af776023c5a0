"""Damaged checkpoints, schedules that do not fit the run, and what a resumed run says.

examples/run_mae_dbp.py runs in this process (its `main` through `run_main`, as the script's own `__main__` does) on a
dozen tiny images: every broken checkpoint must stop the run before training with one line that names the file and
what is wrong with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from safetensors.torch import load_file, save_file

from hf_dbp.tasks.scripts import TrainingBegan, run_main
from hf_dbp.training.checkpoints import MANIFEST, checkpoint_problem, rotate_whole_checkpoints
from hf_dbp.training.training_args import DBPTrainingArguments, schedule_warnings

TINY_VIT = (
    "image_size=16,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
    "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32"
)
R_KEY = "vit.encoder.layer.0.mlp.fc1_decorrelation.R"  # as save_pretrained writes it (transformers' 4.x layout)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mae_script():
    return load_script("run_mae_dbp")


def mae_argv(images: Path, output_dir: Path, *flags) -> list[str]:
    """`run_mae_dbp.py`'s command line for a 2-step run of the tiny ViT with a checkpoint every step, plus `flags`."""
    return [
        "run_mae_dbp.py",
        "--train_dir",
        str(images),
        "--output_dir",
        str(output_dir),
        "--config_overrides",
        TINY_VIT,
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--track_emissions",
        "false",
        "--disable_tqdm",
        "true",
        *map(str, flags),
    ]


def run_mae(module, monkeypatch, capsys, images: Path, output_dir: Path, *flags, caplog=None) -> tuple[int, str, str]:
    """The script as `python examples/run_mae_dbp.py ...` runs it: (exit status, stdout and log, stderr)."""
    monkeypatch.setattr(sys, "argv", mae_argv(images, output_dir, *flags))
    monkeypatch.setattr(TrainingBegan, "began", False)
    monkeypatch.setattr(module, "plot_training_curves", lambda *args, **kwargs: None)
    try:
        run_main(module.main)
        code = 0
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    log = caplog.text if caplog is not None else ""  # in pytest the log goes to its handler, not to stdout
    if caplog is not None:
        caplog.clear()
    return code, captured.out + log, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mae_script):
    """A finished 2-step run with checkpoint-1 and checkpoint-2, and its images."""
    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", mae_argv(root / "images", root / "out"))
        monkeypatch.setattr(TrainingBegan, "began", False)
        monkeypatch.setattr(mae_script, "plot_training_curves", lambda *args, **kwargs: None)
        run_main(mae_script.main)
    assert (root / "out" / "checkpoint-2" / MANIFEST).is_file()
    return root


def damaged_copy(source: Path, target: Path, damage) -> Path:
    shutil.copytree(source, target)
    damage(target)
    return target


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def invalid_settings(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["decorrelation"]["kappa"] = 5
    (folder / "config.json").write_text(json.dumps(config))


def wrong_R(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[R_KEY] = torch.eye(16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "case, flag, damage, expected",
    [
        ("truncated", "--model_name_or_path", truncate, "/model.safetensors is truncated ("),
        (
            "bad_settings",
            "--model_name_or_path",
            invalid_settings,
            "/config.json: decorrelation: DecorrelationConfig.kappa must be a number in [0, 1], got 5",
        ),
        (
            "wrong_R",
            "--model_name_or_path",
            wrong_R,
            "/model.safetensors: vit.layers.0.mlp.fc1_decorrelation.R has shape (16, 16), the model its config describes "
            "needs (32, 32)",
        ),
        (
            "no_optimizer",
            "--resume_from_checkpoint",
            lambda f: (f / "optimizer.pt").unlink(),
            "/optimizer.pt is missing",
        ),
        ("truncated_checkpoint", "--resume_from_checkpoint", truncate, "/model.safetensors is damaged: "),
        ("bad_settings_checkpoint", "--resume_from_checkpoint", invalid_settings, "/config.json is damaged: "),
    ],
)
def test_a_damaged_checkpoint_stops_the_run_with_one_line_naming_the_file(
    trained, mae_script, monkeypatch, capsys, tmp_path, case, flag, damage, expected
):
    source = trained / "out" / ("checkpoint-2" if flag == "--resume_from_checkpoint" else "")
    checkpoint = damaged_copy(source, tmp_path / case, damage)
    code, out, err = run_mae(mae_script, monkeypatch, capsys, trained / "images", tmp_path / "run", flag, checkpoint)
    assert code == 1, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]  # (after progress bars, and transformers' table of the tensors that differ)
    assert last.startswith("run_mae_dbp.py: error: ") and f"{checkpoint}{expected}" in last, err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run" / "trainer_state.json").exists()  # nothing was trained


def test_a_checkpoint_of_another_architecture_is_named_with_the_tensor_that_differs(
    trained, mae_script, monkeypatch, capsys, tmp_path
):
    """The same output folder after changing the model (here: a wider hidden layer): the run would resume from the
    other model's checkpoint; it stops instead, naming the file, the tensor and both shapes."""
    shutil.copytree(trained / "out", tmp_path / "out")
    code, _, err = run_mae(
        mae_script,
        monkeypatch,
        capsys,
        trained / "images",
        tmp_path / "out",
        "--config_overrides",
        TINY_VIT.replace("intermediate_size=64", "intermediate_size=48"),
    )
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("run_mae_dbp.py: error: ") and "Traceback" not in err, err
    assert (
        f"{tmp_path / 'out' / 'checkpoint-2' / 'model.safetensors'}: vit.layers.0.mlp.fc1.bias has shape (64,), the "
        "model its config describes needs (48,)"
        in last
        and "; 7 more tensors differ" in last
    ), err


def test_resume_skips_a_damaged_newest_checkpoint_says_why_and_cleans_up(
    trained, mae_script, monkeypatch, capsys, caplog, tmp_path
):
    """checkpoint-2 damaged after it was saved, a staging folder a killed save left: the run removes the staging
    folder, skips checkpoint-2 naming the file, resumes from checkpoint-1 and trains step 2 again."""
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    (out / "checkpoint-2" / "rng_state.pth").unlink()
    (out / "tmp-checkpoint-3" / "checkpoint-3").mkdir(parents=True)
    (out / "tmp-checkpoint-3" / "checkpoint-3" / "config.json").write_text("{}")
    code, log, err = run_mae(mae_script, monkeypatch, capsys, trained / "images", out, caplog=caplog)
    assert code == 0, log[-3000:] + err[-3000:]
    assert f"Removed {out / 'tmp-checkpoint-3'}: a checkpoint a run was killed while saving" in log
    assert f"Not resuming from {out / 'checkpoint-2'}: {out / 'checkpoint-2' / 'rng_state.pth'} is missing" in log
    assert f"Resuming from {out / 'checkpoint-1'}, the newest whole checkpoint in {out}" in log
    assert not (out / "tmp-checkpoint-3").exists()
    done = next(line for line in log.splitlines() if "Done: " in line)
    assert "2 steps, 1 of them in this run (steps 2-2 in " in done and "resumed from checkpoint-1" in done, done
    assert "train loss" in done and "(that of steps 1-1 carried from checkpoint-1)" in done, done
    expected = json.loads((trained / "out" / "all_results.json").read_text())["train_loss"]
    assert json.loads((out / "all_results.json").read_text())["train_loss"] == expected  # the whole run's mean

    # Run again on the finished folder: nothing to train, and no train loss in the last line.
    code, log, err = run_mae(mae_script, monkeypatch, capsys, trained / "images", out, caplog=caplog)
    assert code == 0, log[-3000:] + err[-3000:]
    done = next(line for line in log.splitlines() if "Done: " in line)
    assert "nothing to train: checkpoint-2 is already at max_steps 2" in done and "train loss" not in done, done
    assert json.loads((out / "all_results.json").read_text())["train_loss"] == expected


def test_checkpoint_problem_names_each_missing_or_shortened_file(trained, tmp_path):
    checkpoint = damaged_copy(trained / "out" / "checkpoint-2", tmp_path / "c", lambda f: None)
    assert checkpoint_problem(str(checkpoint)) is None
    (checkpoint / "scheduler.pt").write_bytes(b"")
    assert checkpoint_problem(str(checkpoint)).startswith(f"{checkpoint / 'scheduler.pt'} is damaged: 0 bytes, ")
    (checkpoint / "scheduler.pt").unlink()
    assert checkpoint_problem(str(checkpoint)) == f"{checkpoint / 'scheduler.pt'} is missing"
    (checkpoint / MANIFEST).unlink()  # as checkpoints of other code: the files every checkpoint needs are checked
    assert checkpoint_problem(str(checkpoint)) is None
    (checkpoint / "optimizer.pt").unlink()
    assert checkpoint_problem(str(checkpoint), needs_optimizer=False) is None
    assert "optimizer.pt is missing" in checkpoint_problem(str(checkpoint))


def test_rotation_keeps_the_newest_checkpoint_whatever_the_modification_times(tmp_path):
    """By step, not by time: with equal modification times (a filesystem with coarse times) the newest stays. The
    checkpoints of a run abandoned by resuming from an earlier one (later steps than the newest) go first."""
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        os.utime(tmp_path / f"checkpoint-{step}", (1e9, 1e9))
    rotate_whole_checkpoints(str(tmp_path), 2, str(tmp_path / "checkpoint-10"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-8"]
    for step in (3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    rotate_whole_checkpoints(str(tmp_path), 2, str(tmp_path / "checkpoint-4"), best=str(tmp_path / "checkpoint-3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_schedules_longer_than_the_run_are_named_with_the_numbers_and_the_flag(tmp_path):
    def args(**values):
        return DBPTrainingArguments(output_dir=str(tmp_path), report_to="none", **values)

    [warning] = schedule_warnings(args(warmup_steps=1500, learning_rate=1e-4, logging_steps=10), 60)
    assert warning.startswith(
        "--warmup_steps 1500 is at least the whole run (60 optimizer steps): the learning rate "
        "never leaves warm-up and never reaches --learning_rate 0.0001 (at most 4e-06)"
    )
    assert "--warmup_steps fewer steps, or a fraction of the run" in warning
    [warning] = schedule_warnings(args(warmup_steps=1500, logging_steps=10), 2000)
    assert warning.startswith("--warmup_steps 1500 takes 1500 of the run's 2000 optimizer steps: most of the run")
    assert schedule_warnings(args(warmup_steps=0.1, logging_steps=10), 60) == []  # a fraction fits any length
    assert schedule_warnings(args(warmup_steps=1500), 160_000) == []
    warnings = schedule_warnings(
        args(eval_strategy="steps", eval_steps=500, logging_steps=100, decorrelation_update_every=80), 60
    )
    assert [w.split(" ")[0] for w in warnings] == ["--logging_steps", "--eval_steps", "--decorrelation_update_every"]
    assert "no train loss is logged" in warnings[0] and "R is never updated" in warnings[2]


def test_segmentation_warms_up_a_tenth_of_any_run_unless_told_and_the_recipe_keeps_its_steps():
    """The paper recipe's 1,500 warm-up steps are the recipe config's, not the script's default: a short run with
    the defaults warms up for a tenth of its steps and gets no warning."""
    import yaml

    module = load_script("run_segmentation")
    args = module.SegmentationTrainingArguments(output_dir="out", report_to="none", logging_steps=10)
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(60) == 6 and schedule_warnings(args, 60) == []
    recipe = yaml.safe_load((REPO_ROOT / "examples" / "configs" / "upernet_mae_vit_b16_ade20k_160k.yaml").read_text())
    assert recipe["warmup_steps"] == 1500 and recipe["max_steps"] == 160_000
    [warning] = schedule_warnings(
        module.SegmentationTrainingArguments(output_dir="out", warmup_steps=1500, logging_steps=10), 60
    )
    assert "--warmup_steps 1500 is at least the whole run (60 optimizer steps)" in warning


def test_a_warm_up_longer_than_the_run_is_said_before_training(tmp_path, tiny_kwargs, caplog):
    """DBPTrainer itself warns, before the first step, on the process that logs: any script or user code gets it."""
    from datasets import Dataset

    from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 16, 16).numpy()}).with_format("torch")
    args = DBPTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        warmup_steps=1500,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        track_emissions=False,
        disable_tqdm=True,
    )
    trainer = DBPTrainer(model=ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs)), args=args, train_dataset=data)
    assert trainer.planned_steps() == 2
    trainer.train()
    [warning] = [
        r.message for r in caplog.records if r.message.startswith("--warmup_steps 1500 is at least the whole")
    ]
    assert "(2 optimizer steps)" in warning
    assert trainer.training_summary().startswith("2 steps in ") and "train loss" in trainer.training_summary()


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi` in transformers.trainer: each upload copies its folder at once (as it is
    when the upload is asked for) into `hub/<path_in_repo>` and returns a finished future."""

    def __init__(self, hub: Path) -> None:
        self.hub, self.uploads = hub, []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, path_in_repo=None, ignore_patterns=None, **kwargs):
        self.uploads.append((folder_path, path_in_repo))
        target = self.hub / (path_in_repo or "root")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
        done = futures.Future()
        done.set_result(None)
        return done


def test_pushed_checkpoints_are_whole(tmp_path, tiny_kwargs, monkeypatch):
    """With --push_to_hub and hub_strategy "checkpoint", Trainer would push from inside its save: from the staging
    folder, before DBP's files are in it. The push comes from the whole checkpoint, and no staging folder goes up."""
    import transformers.trainer
    from datasets import Dataset

    from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    hub = RecordingHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 16, 16).numpy()}).with_format("torch")
    args = DBPTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        report_to="none",
        track_emissions=False,
        disable_tqdm=True,
        push_to_hub=True,
        hub_model_id="me/x",
        hub_strategy="checkpoint",
    )
    trainer = DBPTrainer(model=ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs)), args=args, train_dataset=data)
    trainer.train()
    checkpoint_uploads = [folder for folder, where in hub.uploads if where == "last-checkpoint"]
    assert checkpoint_uploads == [str(tmp_path / "out" / f"checkpoint-{step}") for step in (1, 2)]
    pushed = tmp_path / "hub" / "last-checkpoint"
    for name in (MANIFEST, "run_totals.json", "decorrelation_rng_state_0.pth", "optimizer.pt", "model.safetensors"):
        assert (pushed / name).is_file(), name
    assert checkpoint_problem(str(pushed)) is None
    assert not list((tmp_path / "hub" / "root").glob("tmp-*"))


def test_a_run_resumed_between_two_logging_steps_logs_and_reports_what_an_uninterrupted_run_does(
    tmp_path, tiny_kwargs
):
    """Saved at step 3 but logged every 2 steps: the checkpoint carries the loss of step 3, not logged yet, so the
    resumed run's log at step 4 is the mean of steps 3 and 4, and its train_loss the mean of all 4, bitwise."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining

    class StopAfter3(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    data = Dataset.from_dict({"pixel_values": torch.randn(16, 3, 16, 16).numpy()}).with_format("torch")

    def train(output_dir, callbacks=(), resume=None):
        torch.manual_seed(0)
        args = DBPTrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=4,
            max_steps=4,
            save_steps=1,
            logging_steps=2,
            report_to="none",
            track_emissions=False,
            disable_tqdm=True,
            seed=0,
        )
        model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny_kwargs))
        trainer = DBPTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
        return trainer, trainer.train(resume_from_checkpoint=resume)

    def losses(trainer):
        return [(r["step"], r["loss"], r["decorrelation_loss"]) for r in trainer.state.log_history if "loss" in r]

    full_trainer, full = train(tmp_path / "full")
    train(tmp_path / "resumed", callbacks=[StopAfter3()])
    carried = json.loads((tmp_path / "resumed" / "checkpoint-3" / "run_totals.json").read_text())
    assert carried["train_loss_logged_step"] == 2 and len(carried["train_loss_unlogged"]) == 1
    trainer, resumed = train(tmp_path / "resumed", resume=True)
    assert trainer.resumed_at_step == 3 and trainer.steps_trained == 1
    assert losses(trainer) == losses(full_trainer) and [step for step, _, _ in losses(trainer)] == [2, 4]
    assert resumed.training_loss == full.training_loss == resumed.metrics["train_loss"]
