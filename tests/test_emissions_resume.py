"""Energy and emissions across a resume and across machines.

DBPTrainer runs for real on a tiny model, with a fake codecarbon tracker (tests/fake_tracker.py) whose figures count
its measurements: deterministic, so a resumed run must report exactly what an uninterrupted run of the same length
does, and each of two machines exactly its own figures.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import codecarbon
import pytest
import torch
from conftest import REPO_ROOT, TINY, free_port, offline_env, read_json
from datasets import Dataset
from fake_tracker import FakeTracker
from huggingface_hub import ModelCard
from transformers import TrainerCallback

from hf_dbp import DBPTrainer, ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.training.checkpoints import MANIFEST
from hf_dbp.training.emissions import RUN_TOTALS, EmissionsMeter, carried_for_machine
from hf_dbp.training.model_card import read_emissions_csv
from hf_dbp.training.training_args import DBPTrainingArguments

WORKER = REPO_ROOT / "tests" / "emissions_worker.py"
CARD_FIGURES = ("| energy |", "| emissions |", "| location |", "| hardware |")


@pytest.fixture
def fake_tracker(monkeypatch):
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", FakeTracker)
    monkeypatch.setattr(FakeTracker, "rate", 1.0)


class Crash(Exception):
    pass


class CrashAfterSave(TrainerCallback):
    """The run dies right after saving checkpoint-`step`: no final measurement, nothing written after it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash


def train(output_dir: Path, resume=None, callbacks=()) -> tuple[DBPTrainer, dict]:
    torch.manual_seed(0)
    model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**TINY))
    data = Dataset.from_dict({"pixel_values": torch.randn(32, 3, 16, 16).numpy()}).with_format("torch")
    args = DBPTrainingArguments(
        emissions_country="FRA",
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = DBPTrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    metrics = trainer.train(resume_from_checkpoint=resume).metrics
    trainer.save_model()
    return trainer, metrics


def last_row(path: Path) -> dict[str, str]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))[-1]


def card_figures(folder: Path) -> tuple[dict, list[str]]:
    card = ModelCard.load(folder / "README.md")
    return card.data.co2_eq_emissions, [line for line in card.text.splitlines() if line.startswith(CARD_FIGURES)]


def test_resumed_run_reports_what_an_uninterrupted_run_does(tmp_path, fake_tracker):
    """A run that dies after checkpoint-2 and is resumed (`resume_from_checkpoint=True`) ends with the uninterrupted
    run's energy, emissions and duration: in the train metrics, on the card, in emissions.csv's last row and in
    checkpoint-4's run_totals.json. Its log's train_seconds go on from the checkpoint's."""
    full, full_metrics = train(tmp_path / "full")
    with pytest.raises(Crash):
        train(tmp_path / "resumed", callbacks=[CrashAfterSave(2)])
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    carried = read_json(checkpoint / RUN_TOTALS)
    assert carried["machines"] == read_json(tmp_path / "full" / "checkpoint-2" / RUN_TOTALS)["machines"]
    [machine] = carried["machines"]
    assert machine["energy_consumed"] > 0 and carried["train_seconds"] > 0
    # The checkpoint's card shows the figures it carries.
    assert card_figures(checkpoint)[0]["emissions"] == machine["emissions"] * 1000.0

    resumed, resumed_metrics = train(tmp_path / "resumed", resume=True)
    assert resumed.emissions == full.emissions and resumed.emissions.final
    for key in ("train_energy_kwh", "train_emissions_g"):
        assert resumed_metrics[key] == full_metrics[key], key
    assert card_figures(tmp_path / "resumed") == card_figures(tmp_path / "full")
    for column in ("energy_consumed", "emissions", "duration"):
        assert (
            last_row(tmp_path / "resumed" / "emissions.csv")[column]
            == last_row(tmp_path / "full" / "emissions.csv")[column]
        )
    for name in ("full", "resumed"):
        assert read_emissions_csv(str(tmp_path / name)) == full.emissions
    assert (
        read_json(tmp_path / "resumed" / "checkpoint-4" / RUN_TOTALS)["machines"]
        == read_json(tmp_path / "full" / "checkpoint-4" / RUN_TOTALS)["machines"]
    )

    records = [r for r in resumed.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 1 and 2 from the checkpoint's trainer state
    seconds = [r["train_seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[2] > carried["train_seconds"], seconds
    energy = [r["energy_kwh"] for r in records]
    assert energy == sorted(energy) and energy[2] > machine["energy_consumed"], energy


def test_resume_without_run_totals_counts_from_the_resume_and_says_so(tmp_path, fake_tracker, caplog):
    """A checkpoint without run_totals.json (an older hf-dbp's) still resumes; the figures then start at the resume,
    and the log says so."""
    with pytest.raises(Crash):
        train(tmp_path / "run", callbacks=[CrashAfterSave(2)])
    carried = read_json(tmp_path / "run" / "checkpoint-2" / RUN_TOTALS)["machines"][0]
    (tmp_path / "run" / "checkpoint-2" / RUN_TOTALS).unlink()
    (tmp_path / "run" / "checkpoint-2" / MANIFEST).unlink()  # older checkpoints list their files nowhere either
    resumed, _ = train(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"))
    assert "has no run_totals.json" in caplog.text
    with open(tmp_path / "run" / "emissions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    of_the_resume = [float(r["energy_consumed"]) for r in rows if r["run_id"] == rows[-1]["run_id"]]
    assert of_the_resume[0] < carried["energy_consumed"]  # started from zero
    assert resumed.emissions.energy_kwh == of_the_resume[-1]


def test_carried_figures_of_machines_a_resumed_run_lacks_go_to_machine_0(caplog):
    machines = [
        {"energy_consumed": 1.0, "emissions": 0.5, "duration": 10.0},
        {"energy_consumed": 2.0},
        {"energy_consumed": 4.0, "duration": 30.0},
    ]
    assert carried_for_machine(machines, 0, 3)["energy_consumed"] == 1.0
    assert carried_for_machine(machines, 1, 2) == carried_for_machine([{"energy_consumed": 2.0}], 0, 1)
    on_two = carried_for_machine(machines, 0, 2)
    assert (on_two["energy_consumed"], on_two["emissions"], on_two["duration"]) == (5.0, 0.5, 40.0)
    assert "machine 0 carries on the figures of machines 2-2" in caplog.text
    assert carried_for_machine([], 1, 2)["energy_consumed"] == 0.0  # a fresh run, or resumed without figures


def test_records_of_a_run_on_another_number_of_machines_are_set_aside(tmp_path, fake_tracker):
    """The folder's csv files are those of one run's machines: machine 0 backs up the others (as .bak), so that the
    card never sums the records of two runs."""
    for name in ("emissions.csv", "emissions_machine0.csv", "emissions_machine1.csv", "emissions_machine2.csv"):
        (tmp_path / name).write_text("stale\n")
    meter = EmissionsMeter(str(tmp_path), "FRA", is_local_main_process=True, machine=0, num_machines=2)
    meter.start()
    report = meter.read(stop=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "emissions.csv.bak",
        "emissions_machine0.csv",
        "emissions_machine0.csv.bak",
        "emissions_machine1.csv",
        "emissions_machine2.csv.bak",
    ]
    # Machine 0's own stale file had other columns: backed up too (by the writer, as codecarbon does), rows afresh.
    assert float(last_row(tmp_path / "emissions_machine0.csv")["energy_consumed"]) == report.energy_kwh


def test_two_machines_keep_a_record_each_and_resume_each_from_its_own(tmp_path):
    """Two torchrun "machines" on loopback (--nnodes 2, one process each, one output folder), the fake tracker
    counting twice as fast on machine 1: each machine writes its own emissions_machine<k>.csv, the card is their sum,
    and a run stopped after checkpoint-2 and resumed ends with every machine's figures of the uninterrupted run."""
    port = str(free_port())
    logs = [tmp_path / f"node{k}.log" for k in (0, 1)]
    processes = []
    for k in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(k),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            str(WORKER),
            str(tmp_path),
        ]
        with open(logs[k], "w") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=offline_env(tmp_path / "hf"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        codes = [p.wait(timeout=120) for p in processes]
    finally:
        for p in processes:  # torchrun and its worker: the whole session, should one of them hang
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert codes == [0, 0], "\n\n".join(log.read_text()[-4000:] for log in logs)
    reported = json.loads((tmp_path / "reports.json").read_text())

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert not (full / "emissions.csv").exists()
    rows = {k: last_row(full / f"emissions_machine{k}.csv") for k in (0, 1)}
    energy = [float(rows[k]["energy_consumed"]) for k in (0, 1)]
    assert energy[0] > 0 and energy[1] == 2 * energy[0]  # each machine its own tracker's figures
    total = read_emissions_csv(str(full))
    assert total.energy_kwh == sum(energy) and total.emissions_g == sum(
        float(rows[k]["emissions"]) * 1000.0 for k in (0, 1)
    )
    assert total.hardware.startswith("2 machines: ") and "rate 1" in total.hardware and "rate 2" in total.hardware
    assert reported["full"] == total.to_dict()  # the train metrics and the trainer's report: the files' sum
    co2, lines = card_figures(full)
    assert co2["emissions"] == total.emissions_g and f"| energy | {total.energy_kwh:.6g} kWh |" in lines

    carried = read_json(resumed / "checkpoint-2" / RUN_TOTALS)["machines"]
    assert len(carried) == 2 and carried[1]["energy_consumed"] == 2 * carried[0]["energy_consumed"] > 0
    for k in (0, 1):
        for column in ("energy_consumed", "emissions", "duration"):
            assert last_row(resumed / f"emissions_machine{k}.csv")[column] == rows[k][column], (k, column)
    assert reported["resumed"] == reported["full"]
    assert card_figures(resumed) == card_figures(full)
