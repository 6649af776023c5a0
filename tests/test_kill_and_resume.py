"""Killed and resumed equals uninterrupted: real runs of the example scripts, SIGKILLed and resumed with the same command.

tests/kill_worker.py runs each script once uninterrupted, then kills it at moments chosen with a seeded generator
(keyed to the phase the run reports: training, saving a checkpoint, evaluating, finishing; plus a random part of that
phase's duration) and resumes it with the same command; on 2 processes one process is killed and the other stopped as
torchrun would. Every resumed run must finish, and its final weights, every R, its logged losses and learning rates,
its evaluation losses, train loss and emissions (codecarbon replaced by tests/fake_tracker.py: deterministic) must be
exactly those of the uninterrupted run. Only wall-clock figures (train_seconds, runtimes, throughputs) differ.

The runs write to a tmpfs when the machine has one (/dev/shm): fsync costs nothing there, so the many saves are fast;
the checkpoint code is the same.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, offline_env, read_json
from PIL import Image
from safetensors.torch import load_file

from hf_dbp.tasks.text_data import demo_text_dataset

WORKER = REPO_ROOT / "tests" / "kill_worker.py"
SEED = 0
TINY_VIT = (
    "image_size=16,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
    "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32"
)
TINY_LLAMA = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=2,intermediate_size=48,"
    "max_position_embeddings=64"
)
# Saved at every step (the last 3 kept), logged at every step (language modelling and the 2 processes: every 2, so
# that checkpoints fall between two logs too), evaluated every 3 steps: 8 steps of a tiny model.
COMMON = [
    "--output_dir",
    "{output_dir}",
    "--max_steps",
    "8",
    "--save_steps",
    "1",
    "--save_total_limit",
    "3",
    "--logging_steps",
    "1",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "3",
    "--report_to",
    "none",
    "--dataloader_num_workers",
    "0",
    "--emissions_country",
    "FRA",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
]
# Figures that are wall-clock time: the only ones a resumed run may report differently.
CLOCK = (
    "train_seconds",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
)


def write_images(folder: Path, count: int = 40) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        size = int(rng.integers(18, 30))
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def write_text(folder: Path) -> tuple[Path, Path]:
    text = demo_text_dataset()
    folder.mkdir(parents=True)
    train, validation = folder / "train.txt", folder / "validation.txt"
    train.write_text("\n".join(text["train"]["text"][:60]))
    validation.write_text("\n".join(text["validation"]["text"][:40]))
    return train, validation


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    root = Path(tempfile.mkdtemp(prefix="hf-dbp-kill-", dir="/dev/shm")) if os.access("/dev/shm", os.W_OK) else base
    try:
        write_images(root / "images")
        train, validation = write_text(root / "text")
        # Evaluation in a few batches, so that it lasts long enough for kills to land in it.
        mae = [
            "--train_dir",
            str(root / "images"),
            "--config_overrides",
            TINY_VIT,
            "--per_device_train_batch_size",
            "4",
            "--per_device_eval_batch_size",
            "2",
            *COMMON,
        ]
        clm = [
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--model_type",
            "llama",
            "--config_overrides",
            TINY_LLAMA,
            "--tokenizer_vocab_size",
            "300",
            "--block_size",
            "32",
            "--per_device_train_batch_size",
            "4",
            "--per_device_eval_batch_size",
            "2",
            *COMMON,
        ]
        jobs = [
            {"name": "mae", "script": "examples/run_mae_dbp.py", "args": mae, "kills": 10},
            # One of 2 processes killed while saving, once while training; the other stopped as torchrun does.
            {
                "name": "mae_2_processes",
                "script": "examples/run_mae_dbp.py",
                "args": [*mae, "--logging_steps", "2"],
                "kills": 2,
                "world_size": 2,
                "phases": ["saving", "training"],
            },
            {"name": "clm", "script": "examples/run_clm_dbp.py", "args": [*clm, "--logging_steps", "2"], "kills": 10},
        ]
        # Two workers side by side (a core each where there are two): MAE on 1 and 2 processes, and language modelling.
        env = {**offline_env(base / "hf"), "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
        workers = []
        for k, (share, script) in enumerate(
            ((jobs[:2], "examples/run_mae_dbp.py"), (jobs[2:], "examples/run_clm_dbp.py"))
        ):
            plan = {"root": str(root), "seed": SEED, "timeout": 120, "preload": [script], "jobs": share}
            (root / f"plan{k}.json").write_text(json.dumps(plan))
            workers.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(root / f"plan{k}.json"), str(root / f"report{k}.json")],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        report = {}
        for k, worker in enumerate(workers):
            output = worker.communicate(timeout=600)[0]
            assert worker.returncode == 0, output[-5000:]
            report.update(read_json(root / f"report{k}.json"))
        (base / "report.json").write_text(json.dumps(report, indent=1))  # kept with pytest's temporary files
        yield report
    finally:
        if root != base:
            shutil.rmtree(root, ignore_errors=True)


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records]


def last_row(path: Path) -> dict:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))[-1]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Everything a finished run leaves that is not wall-clock time is the uninterrupted run's, exactly."""
    weights, expected = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert any(key.endswith(".R") for key in weights)
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    history = read_json(resumed / "trainer_state.json")["log_history"]
    assert comparable(history) == comparable(read_json(reference / "trainer_state.json")["log_history"])
    results = read_json(resumed / "all_results.json")
    assert comparable([results]) == comparable([read_json(reference / "all_results.json")])
    for column in ("energy_consumed", "emissions", "cpu_energy", "duration"):
        assert last_row(resumed / "emissions.csv")[column] == last_row(reference / "emissions.csv")[column], column
    checkpoints = sorted(p.name for p in resumed.iterdir() if p.name.startswith(("checkpoint-", "tmp-checkpoint")))
    assert checkpoints == sorted(p.name for p in reference.iterdir() if p.name.startswith("checkpoint-"))


@pytest.mark.parametrize("job", ["mae", "clm", "mae_2_processes"])
def test_killed_and_resumed_runs_end_as_the_uninterrupted_run(killed_runs, job):
    report = killed_runs[job]
    assert report["reference_codes"] == [0] * len(report["reference_codes"]), report.get("reference_log_tail")
    reference = Path(report["reference"])
    for kill in report["kills"]:
        assert "missed" not in kill, kill
        assert kill["killed_code"] == -9, kill
        assert kill["resumed_codes"] == [0] * len(kill["resumed_codes"]), kill.get("resumed_log_tail")
        newest = kill["on_disk"]["newest_whole"]
        if newest is not None:  # it says which checkpoint it resumed from, and which staging folder it removed
            assert any(f"Resuming from {kill['output_dir']}/{newest}," in line for line in kill["resumed_said"]), kill
        for staging in kill["on_disk"]["staging"]:
            assert any(line.startswith(f"Removed {kill['output_dir']}/{staging}") for line in kill["resumed_said"])
        [done] = [line for line in kill["resumed_said"] if line.startswith("Done: ")]
        if newest == "checkpoint-8":  # killed after training: says so, and prints no train loss
            assert "nothing to train: checkpoint-8 is already at max_steps 8. " in done and "train loss" not in done
        elif newest is not None:  # which steps it trained, and that the train loss of the others is carried
            step = int(newest.split("-")[1])
            assert f"8 steps, {8 - step} of them in this run (steps {step + 1}-8 in " in done, done
            assert f"(that of steps 1-{step} carried from {newest})" in done, done
        else:
            assert "8 steps in " in done and "carried" not in done, done
        assert_same_run(Path(kill["output_dir"]), reference)


def test_kills_landed_in_every_phase(killed_runs):
    kills = [kill for job in killed_runs.values() for kill in job["kills"]]
    assert len(kills) >= 20
    landed = Counter(kill["landed"] for kill in kills)
    for phase in ("training", "saving", "evaluating"):
        assert landed[phase] >= 1, landed
    for job in ("mae", "clm"):  # killed once training was over: the resumed run had nothing left to train
        assert any(kill["on_disk"]["newest_whole"] == "checkpoint-8" for kill in killed_runs[job]["kills"])
    # A save interrupted before its checkpoint was whole left only a staging folder, never a checkpoint-N.
    assert any(kill["on_disk"]["staging"] for job in killed_runs.values() for kill in job["kills"])
