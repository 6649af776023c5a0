"""Energy, emissions and model cards of real runs: hf_dbp.training.emissions, hf_dbp.training.model_card and DBPTrainer's side of them.

The scripts run for real, in subprocesses, offline, on tiny models (2 to 4 optimizer steps). The module-scoped fixture
`runs` starts all of them once, two at a time (most of a run's time is its imports, on one core):

- "dbp": examples/run_mae_dbp.py, DBP, 4 steps, a checkpoint every 2 steps, in France;
- "bp": the same with --bp_baseline, 2 steps;
- "segmentation": examples/run_segmentation.py on a tiny DBP checkpoint and a tiny ADE20K-layout set, in Germany;
- "two_processes": run_mae_dbp.py under `accelerate launch` with 2 CPU processes (gloo);
- "resumed": "dbp" again from its checkpoint-2 (--resume_from_checkpoint, another output folder), once "dbp" ended.

codecarbon measures this machine for real, so the figures are tiny and vary from run to run: the tests compare the
files of one run with each other (card, emissions.csv, all_results.json, trainer_state.json), never with constants.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAE_SCRIPT, REPO_ROOT, SEGMENTATION_SCRIPT, TINY, Run, offline_env, read_json
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from transformers import AutoConfig

import hf_dbp
from hf_dbp.tasks.segmentation.demo import make_demo_ade20k
from hf_dbp.training.emissions import WORLD_AVERAGE, EmissionsMeter, resolve_country
from hf_dbp.training.model_card import read_emissions_csv, write_model_card

TINY_MAE = dict(TINY)
TINY_SEGMENTATION_ENCODER = {**TINY_MAE, "num_hidden_layers": 4}
# DBP settings no default has, so that the card shows the run's own values.
DECORRELATION_LR, KAPPA = 0.0025, 0.02
MAE_FLAGS = [
    "--config_overrides",
    ",".join(f"{key}={value}" for key, value in TINY_MAE.items()),
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--dataloader_num_workers",
    "0",
    "--decorrelation_lr",
    str(DECORRELATION_LR),
    "--decorrelation_kappa",
    str(KAPPA),
]
SEGMENTATION_FLAGS = [
    "--upernet_hidden_size",
    "16",
    "--auxiliary_channels",
    "8",
    "--crop_size",
    "32",
    "--max_steps",
    "2",
    "--warmup_steps",
    "0",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--dataloader_num_workers",
    "0",
    "--emissions_country",
    "DEU",
]
# codecarbon's emissions.csv header (codecarbon 3.3), copied from a real run.
EMISSIONS_CSV_HEADER = (
    "timestamp,project_name,run_id,experiment_id,duration,emissions,emissions_rate,cpu_power,gpu_power,ram_power,"
    "cpu_energy,gpu_energy,ram_energy,energy_consumed,water_consumed,country_name,country_iso_code,region,"
    "cloud_provider,cloud_region,os,python_version,codecarbon_version,cpu_count,cpu_model,gpu_count,gpu_model,"
    "longitude,latitude,ram_total_size,tracking_mode,cpu_utilization_percent,gpu_utilization_percent,"
    "ram_utilization_percent,ram_used_gb,on_cloud,pue,wue"
)
REL = 1e-12  # the card's and the csv's figures are the same floats, up to the kg -> g product


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def subprocess_env(hf_home: Path) -> dict[str, str]:
    env = offline_env(hf_home)
    env.pop("CODECARBON_COUNTRY_ISO_CODE", None)  # the country comes from the flags alone
    return env


def csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "emissions.csv", newline="") as file:
        return list(csv.DictReader(file))


def load_card(folder: Path) -> ModelCard:
    path = folder / "README.md"
    assert path.is_file(), f"no model card in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return ModelCard.load(path)


def training_records(output_dir: Path) -> list[dict]:
    return [r for r in read_json(output_dir / "trainer_state.json")["log_history"] if "loss" in r]


def write_images(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        PILImage.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def write_emissions_csv(folder: Path, rows: list[dict[str, str]]) -> None:
    """An emissions.csv in codecarbon's format; fields not given are those of a real row."""
    example = {
        "timestamp": "2026-01-01T00:00:00",
        "project_name": "hf-dbp",
        "run_id": "r",
        "experiment_id": "e",
        "duration": "12.5",
        "emissions_rate": "0.0001",
        "cpu_power": "42.5",
        "gpu_power": "0.0",
        "ram_power": "20.0",
        "cpu_energy": "0.004",
        "gpu_energy": "0.0",
        "ram_energy": "0.001",
        "energy_consumed": "0.005",
        "water_consumed": "0.0",
        "country_name": "France",
        "country_iso_code": "FRA",
        "os": "Linux",
        "python_version": "3.11.7",
        "codecarbon_version": "3.3.2",
        "cpu_count": "8",
        "cpu_model": "AMD EPYC",
        "gpu_count": "0",
        "gpu_model": "",
        "ram_total_size": "32.0",
        "tracking_mode": "machine",
        "on_cloud": "N",
        "pue": "1.0",
        "wue": "0.0",
    }
    fields = EMISSIONS_CSV_HEADER.split(",")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "emissions.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({**example, **row})


def isolated_codecarbon(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """No country from anywhere: no CODECARBON_* variable, no .codecarbon.config in the home or working directory."""
    for key in list(os.environ):
        if key.lower().startswith("codecarbon_"):
            monkeypatch.delenv(key)
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.chdir(folder)


# ----------------------------------------------------------------------------------------------------------------------
# The runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("emission_runs")
    write_images(root / "images" / "train", 12, seed=0)
    write_images(root / "images" / "validation", 4, seed=1)
    images = ["--train_dir", root / "images" / "train", "--validation_dir", root / "images" / "validation"]

    torch.manual_seed(0)
    encoder = hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_SEGMENTATION_ENCODER))
    encoder.save_pretrained(root / "encoder")
    make_demo_ade20k(str(root / "ade20k"), num_train=8, num_validation=4, size=32)

    launch_two = [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    commands = {
        # `--cpu` would start one process only (accelerate's simple launcher); `--multi_gpu` starts two through
        # torchrun, and the script's --use_cpu makes them a gloo group on the CPU (without it each would think it
        # runs alone, on the same output_dir).
        "two_processes": [
            *launch_two,
            MAE_SCRIPT,
            "--use_cpu",
            *images,
            *MAE_FLAGS,
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "3",
            "--save_strategy",
            "no",
            "--emissions_country",
            "FRA",
        ],
        "dbp": [
            MAE_SCRIPT,
            *images,
            *MAE_FLAGS,
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--emissions_country",
            "FRA",
        ],
        "segmentation": [
            SEGMENTATION_SCRIPT,
            "--model_name_or_path",
            root / "encoder",
            "--data_dir",
            root / "ade20k",
            *SEGMENTATION_FLAGS,
        ],
        "bp": [
            MAE_SCRIPT,
            *images,
            *MAE_FLAGS,
            "--bp_baseline",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--emissions_country",
            "FRA",
        ],
        "resumed": [
            MAE_SCRIPT,
            *images,
            *MAE_FLAGS,
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--emissions_country",
            "FRA",
            "--resume_from_checkpoint",
            root / "dbp" / "out" / "checkpoint-2",
        ],
    }

    def start(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *map(str, commands[name]), "--output_dir", str(root / name / "out")],
            cwd=REPO_ROOT,
            env=subprocess_env(root / name / "hf_home"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(start, name) for name in commands if name not in ("dbp", "resumed")}
        futures["dbp"] = pool.submit(lambda: (start("dbp"), start("resumed")))  # "resumed" needs dbp's checkpoint
        results = {name: future.result() for name, future in futures.items()}
        results["dbp"], results["resumed"] = results["dbp"]
    return {name: Run(results[name], root / name / "out") for name in commands}


# ----------------------------------------------------------------------------------------------------------------------
# 1. A pre-training run


def test_pretraining_card_metadata_matches_the_run_files(runs):
    """output_dir/README.md is a valid Hub card whose co2_eq_emissions (grams) is the last row of emissions.csv (kg),
    measured by codecarbon in France during pre-training; its model index holds all_results.json's eval_loss."""
    run = runs["dbp"]
    run.assert_succeeded()
    card = load_card(run.output_dir)
    last = csv_rows(run.output_dir)[-1]
    co2 = card.data.co2_eq_emissions
    assert math.isclose(co2["emissions"], float(last["emissions"]) * 1000.0, rel_tol=REL), (co2, last["emissions"])
    assert co2["emissions"] > 0
    assert co2["source"] == "codecarbon"
    assert co2["training_type"] == "pre-training"
    assert co2["geographical_location"] == "France"
    assert isinstance(co2["hardware_used"], str) and co2["hardware_used"].strip()
    assert "CPU" in co2["hardware_used"]

    assert card.data.library_name == "transformers"
    assert {"dbp", "mae"} <= set(card.data.tags), card.data.tags
    assert len(card.data.tags) == len(set(card.data.tags)), card.data.tags
    # The Hub expects dataset ids in `datasets:`; a local folder is named in the card's text instead.
    assert card.data.datasets is None
    assert f"| data | {run.output_dir.parent.parent / 'images' / 'train'} |" in card.text
    assert card.data.base_model is None  # trained from scratch

    results = read_json(run.output_dir / "all_results.json")
    [result] = card.data.eval_results
    assert result.metric_type == "loss"
    assert result.metric_value == results["eval_loss"]
    assert result.dataset_split == "validation"


def test_pretraining_card_body_shows_settings_energy_and_loading(runs):
    """The card's text shows the run's DBP settings, its energy in kWh, and how to load the model with hf_dbp and
    without it (`hf-dbp merge`, then plain transformers)."""
    run = runs["dbp"]
    run.assert_succeeded()
    body = load_card(run.output_dir).text
    assert f"| decorrelation lr | {DECORRELATION_LR} |" in body, body
    assert f"| kappa | {KAPPA} |" in body, body
    energy = float(csv_rows(run.output_dir)[-1]["energy_consumed"])
    assert f"| energy | {energy:.6g} kWh |" in body, body
    assert "| location | France |" in body
    assert "import hf_dbp" in body and "AutoModelForPreTraining.from_pretrained" in body
    assert "hf-dbp merge" in body and "ViTMAEForPreTraining" in body and "ViTModel" in body
    assert "BP baseline" not in body


def test_train_metrics_carry_the_final_csv_row(runs):
    """all_results.json's train_energy_kwh and train_emissions_g are the final row of emissions.csv (kWh, and kg
    turned into grams); the csv is cumulative: every column of figures only grows."""
    run = runs["dbp"]
    run.assert_succeeded()
    results = read_json(run.output_dir / "all_results.json")
    rows = csv_rows(run.output_dir)
    assert math.isclose(results["train_energy_kwh"], float(rows[-1]["energy_consumed"]), rel_tol=REL)
    assert math.isclose(results["train_emissions_g"], float(rows[-1]["emissions"]) * 1000.0, rel_tol=REL)
    assert results["train_energy_kwh"] > 0
    assert len({row["run_id"] for row in rows}) == 1, "one tracker per run"
    for column in ("energy_consumed", "emissions", "duration"):
        values = [float(row[column]) for row in rows]
        assert values == sorted(values), (column, values)


def test_log_records_have_cumulative_energy(runs):
    """Every training log record in trainer_state.json has energy_kwh and emissions_g (grams), non-decreasing from
    record to record and never above the run's total."""
    run = runs["dbp"]
    run.assert_succeeded()
    records = training_records(run.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    results = read_json(run.output_dir / "all_results.json")
    for key, total in (("energy_kwh", results["train_energy_kwh"]), ("emissions_g", results["train_emissions_g"])):
        values = [r[key] for r in records]
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values), (key, values)
        assert values == sorted(values), (key, values)
        assert values[-1] <= total * (1 + REL), (key, values, total)
    # Each record is a row that the tracker wrote to emissions.csv at that moment (kg there, grams here).
    csv_grams = [float(row["emissions"]) * 1000.0 for row in csv_rows(run.output_dir)]
    for record in records:
        assert any(math.isclose(record["emissions_g"], g, rel_tol=REL) for g in csv_grams), (record, csv_grams)


def test_checkpoints_get_cards_with_the_figures_so_far(runs):
    """checkpoint-2/README.md (and checkpoint-4's) parse, and carry the emissions when they were saved: those of
    their run_totals.json, which a resumed run goes on from; at least those logged at their step."""
    run = runs["dbp"]
    run.assert_succeeded()
    by_step = {r["step"]: r for r in training_records(run.output_dir)}
    for step in (2, 4):
        folder = run.output_dir / f"checkpoint-{step}"
        card = load_card(folder)
        co2 = card.data.co2_eq_emissions
        assert co2 is not None, card.content[:2000]
        [machine] = read_json(folder / "run_totals.json")["machines"]
        assert math.isclose(co2["emissions"], machine["emissions"] * 1000.0, rel_tol=REL), (co2, machine)
        assert co2["emissions"] >= by_step[step]["emissions_g"], (co2, by_step[step])
        assert co2["geographical_location"] == "France" and co2["training_type"] == "pre-training"
        assert f"| optimizer steps | {step} |" in card.text
        assert f"| decorrelation lr | {DECORRELATION_LR} |" in card.text


def test_bp_baseline_card_says_so(runs):
    """The BP baseline's card calls it the BP baseline, has no DBP settings table and no DBP tag, and still carries
    the emissions of the run."""
    run = runs["bp"]
    run.assert_succeeded()
    card = load_card(run.output_dir)
    assert "BP baseline" in card.text
    assert "decorrelation lr" not in card.text and "| kappa |" not in card.text
    assert "dbp" not in card.data.tags and "mae" in card.data.tags
    assert "import hf_dbp" not in card.text  # a plain ViTMAE: loads with transformers alone
    co2 = card.data.co2_eq_emissions
    assert math.isclose(co2["emissions"], float(csv_rows(run.output_dir)[-1]["emissions"]) * 1000.0, rel_tol=REL)
    assert co2["training_type"] == "pre-training"


def test_resumed_script_run_goes_on_from_the_checkpoint_figures(runs):
    """run_mae_dbp.py --resume_from_checkpoint dbp/checkpoint-2: every row of the resumed run's emissions.csv, its
    log records from step 3 on, its train metrics and its card count the energy, CO2 and duration carried in
    checkpoint-2's run_totals.json (what dbp had measured until then) on top of its own; train_seconds go on too."""
    run = runs["resumed"]
    run.assert_succeeded()
    totals = read_json(runs["dbp"].output_dir / "checkpoint-2" / "run_totals.json")
    [carried] = totals["machines"]
    rows = csv_rows(run.output_dir)
    assert len({row["run_id"] for row in rows}) == 1
    for column in ("energy_consumed", "emissions", "duration"):
        assert float(rows[0][column]) > carried[column] > 0, (column, rows[0][column], carried)
    results = read_json(run.output_dir / "all_results.json")
    assert math.isclose(results["train_energy_kwh"], float(rows[-1]["energy_consumed"]), rel_tol=REL)
    assert math.isclose(
        load_card(run.output_dir).data.co2_eq_emissions["emissions"], results["train_emissions_g"], rel_tol=REL
    )
    records = training_records(run.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("energy_kwh", "train_seconds"):
        values = [r[key] for r in records]
        assert values == sorted(values), (key, values)
    assert (
        records[2]["energy_kwh"] > carried["energy_consumed"] and records[2]["train_seconds"] > totals["train_seconds"]
    )


# ----------------------------------------------------------------------------------------------------------------------
# 2. A segmentation run


def test_segmentation_card(runs):
    """The fine-tuning card names its base model (the pre-training checkpoint), the segmentation metrics of
    all_results.json, and emissions measured in Germany."""
    run = runs["segmentation"]
    run.assert_succeeded()
    card = load_card(run.output_dir)
    co2 = card.data.co2_eq_emissions
    assert co2["training_type"] == "fine-tuning"
    assert co2["geographical_location"] == "Germany"
    assert math.isclose(co2["emissions"], float(csv_rows(run.output_dir)[-1]["emissions"]) * 1000.0, rel_tol=REL)
    # A local folder is no Hub id: named in the body, left out of the metadata's base_model.
    assert card.data.base_model is None
    assert f"| started from | {run.output_dir.parent.parent / 'encoder'} |" in card.text
    assert {"semantic-segmentation", "upernet"} <= set(card.data.tags)
    results = read_json(run.output_dir / "all_results.json")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {
        "mean_iou": results["eval_mean_iou"],
        "mean_accuracy": results["eval_mean_accuracy"],
        "overall_accuracy": results["eval_overall_accuracy"],
    }
    assert all(r.task_type == "image-segmentation" for r in card.data.eval_results)
    assert "AutoModelForSemanticSegmentation" in card.text


def test_segmentation_card_maps_each_metric(runs, tmp_path):
    """With distinct values (2 steps give 0.0 for all three), each metric of all_results.json lands under its own
    name, and emissions of a run on a GPU name it."""
    run = runs["segmentation"]
    run.assert_succeeded()
    config = AutoConfig.from_pretrained(run.output_dir)
    (tmp_path / "all_results.json").write_text(
        json.dumps({"eval_mean_iou": 0.25, "eval_mean_accuracy": 0.5, "eval_overall_accuracy": 0.75, "eval_loss": 2.0})
    )
    write_emissions_csv(
        tmp_path,
        [
            {
                "emissions": "0.5",
                "country_name": "Germany",
                "country_iso_code": "DEU",
                "gpu_count": "2",
                "gpu_model": "NVIDIA H100",
            }
        ],
    )
    write_model_card(str(tmp_path), config, base_model="some/encoder")
    card = load_card(tmp_path)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "mean_iou": 0.25,
        "mean_accuracy": 0.5,
        "overall_accuracy": 0.75,
    }
    assert card.data.co2_eq_emissions["emissions"] == 500.0
    assert "2 x NVIDIA H100" in card.data.co2_eq_emissions["hardware_used"]


# ----------------------------------------------------------------------------------------------------------------------
# 3. Units, the world average, and the country


def test_read_emissions_csv_gives_grams_from_the_last_row(tmp_path):
    """codecarbon writes kg; the report is in grams, from the last (cumulative) row."""
    write_emissions_csv(
        tmp_path,
        [
            {"emissions": "0.001", "energy_consumed": "0.004"},
            {"emissions": "0.002", "energy_consumed": "0.005", "duration": "30.0"},
        ],
    )
    report = read_emissions_csv(str(tmp_path))
    assert report.emissions_g == pytest.approx(2.0, rel=REL)
    assert report.energy_kwh == pytest.approx(0.005, rel=REL)
    assert report.duration_s == 30.0
    assert report.location == "France"
    assert report.hardware == "8 CPU cores (AMD EPYC)"
    assert report.final
    assert read_emissions_csv(str(tmp_path / "nowhere")) is None


def test_world_average_is_labelled_on_the_card(tmp_path):
    """A run without a country (empty country columns in the csv) is labelled as codecarbon's world average on the
    card, in the metadata and the text: never silently a country."""
    write_emissions_csv(tmp_path, [{"emissions": "0.003", "country_name": "", "country_iso_code": ""}])
    assert read_emissions_csv(str(tmp_path)).location == WORLD_AVERAGE
    write_model_card(str(tmp_path), hf_dbp.ViTMAEDBPConfig(**TINY_MAE))
    card = load_card(tmp_path)
    location = card.data.co2_eq_emissions["geographical_location"]
    assert location == WORLD_AVERAGE
    assert "unknown" in location and "world-average" in location
    assert card.data.co2_eq_emissions["emissions"] == pytest.approx(3.0, rel=REL)
    assert f"| location | {WORLD_AVERAGE} |" in card.text


def test_meter_without_country_measures_at_the_world_average(tmp_path, monkeypatch):
    """codecarbon's tracker, given no country, writes a row without one, and the meter and the csv reader both call
    it the world average; the figures of `read` are grams of the csv's kg."""
    isolated_codecarbon(monkeypatch, tmp_path / "home")
    assert resolve_country(None) == (None, "not given")
    meter = EmissionsMeter(str(tmp_path / "out"), None, is_local_main_process=True)
    meter.start()
    sum(i * i for i in range(200_000))  # something to measure
    report = meter.read(stop=True)
    assert report.final and report.location == WORLD_AVERAGE
    rows = csv_rows(tmp_path / "out")
    assert rows[-1]["country_iso_code"] == ""
    assert report.emissions_g == pytest.approx(float(rows[-1]["emissions"]) * 1000.0, rel=REL)
    assert read_emissions_csv(str(tmp_path / "out")).location == WORLD_AVERAGE
    assert meter.read() is report  # stopped: the total stays


def test_meter_logs_nothing_of_codecarbon_but_its_errors(tmp_path, monkeypatch, capfd):
    """codecarbon's start-up lines (its "offline tracker init", "Multiple instances of codecarbon are allowed to run at
    the same time.") are not in a run's log: only its errors would be."""
    isolated_codecarbon(monkeypatch, tmp_path / "home")
    capfd.readouterr()
    meter = EmissionsMeter(str(tmp_path / "out"), "FRA", is_local_main_process=True)
    meter.start()
    meter.read(stop=True)
    out, err = capfd.readouterr()
    assert "codecarbon" not in out + err, out + err


def test_meter_on_another_process_measures_nothing(tmp_path):
    """Only the local main process runs a tracker: elsewhere there is no csv and the report is zero."""
    meter = EmissionsMeter(str(tmp_path / "out"), "FRA", is_local_main_process=False)
    meter.start()
    report = meter.read(stop=True)
    assert (report.energy_kwh, report.emissions_g) == (0.0, 0.0)
    assert not (tmp_path / "out").exists()


def test_resolve_country_order_and_validation(tmp_path, monkeypatch):
    """The flag beats CODECARBON_COUNTRY_ISO_CODE, which beats codecarbon's config file; lower case is accepted;
    an unknown code raises ValueError naming it and where it came from."""
    isolated_codecarbon(monkeypatch, tmp_path)
    (tmp_path / ".codecarbon.config").write_text("[codecarbon]\ncountry_iso_code = nld\n")
    assert resolve_country(None) == ("NLD", "codecarbon's config file")
    monkeypatch.setenv("CODECARBON_COUNTRY_ISO_CODE", "deu")
    assert resolve_country(None) == ("DEU", "CODECARBON_COUNTRY_ISO_CODE")
    assert resolve_country("fra") == ("FRA", "--emissions_country")
    assert resolve_country(" Usa ") == ("USA", "--emissions_country")
    with pytest.raises(ValueError, match="'XYZ'.*--emissions_country"):
        resolve_country("XYZ")
    monkeypatch.setenv("CODECARBON_COUNTRY_ISO_CODE", "xyz")
    with pytest.raises(ValueError, match="'XYZ'.*CODECARBON_COUNTRY_ISO_CODE"):
        resolve_country(None)
    assert resolve_country("GBR")[0] == "GBR"  # the flag still wins over a bad variable


def test_trainer_refuses_an_unknown_country_before_training(tmp_path, monkeypatch):
    """DBPTrainer checks the country in its constructor: nothing is trained or written. Without tracking, the
    country is not looked at."""
    isolated_codecarbon(monkeypatch, tmp_path / "home")
    model = hf_dbp.ViTMAEDBPForPreTraining(hf_dbp.ViTMAEDBPConfig(**TINY_MAE))
    args = hf_dbp.DBPTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="XYZ"):
        hf_dbp.DBPTrainer(model=model, args=dataclasses.replace(args, emissions_country="XYZ"))
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("CODECARBON_COUNTRY_ISO_CODE", "XYZ")
    with pytest.raises(ValueError, match="XYZ.*CODECARBON_COUNTRY_ISO_CODE"):
        hf_dbp.DBPTrainer(model=model, args=args)
    trainer = hf_dbp.DBPTrainer(model=model, args=dataclasses.replace(args, track_emissions=False))
    assert trainer.emissions_callback is None


# ----------------------------------------------------------------------------------------------------------------------
# 4. Two processes, one tracker


def test_two_processes_run_one_tracker(runs):
    """Under `accelerate launch` with 2 processes on one machine, only the local main process measures: every row
    of emissions.csv has the same run_id, and the energy in the log and the train metrics is the csv's (summed over
    processes, the other one adds 0), not twice it."""
    run = runs["two_processes"]
    run.assert_succeeded()
    assert run.output.count("distributed: True") == 2, run.output[-4000:]
    assert "optimizer steps of 4 images" in run.output  # 2 processes x 2 images
    rows = csv_rows(run.output_dir)
    assert len({row["run_id"] for row in rows}) == 1, [row["run_id"] for row in rows]
    results = read_json(run.output_dir / "all_results.json")
    assert math.isclose(results["train_energy_kwh"], float(rows[-1]["energy_consumed"]), rel_tol=REL)
    assert math.isclose(results["train_emissions_g"], float(rows[-1]["emissions"]) * 1000.0, rel_tol=REL)
    csv_energy = [float(row["energy_consumed"]) for row in rows]
    for record in training_records(run.output_dir):
        assert any(math.isclose(record["energy_kwh"], e, rel_tol=REL) for e in csv_energy), (record, csv_energy)
    card = load_card(run.output_dir)
    assert math.isclose(card.data.co2_eq_emissions["emissions"], results["train_emissions_g"], rel_tol=REL)
