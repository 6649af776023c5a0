"""hf_dbp.comparison (examples/compare_bp_dbp.py, sweep_bp_dbp.py): the comparison arithmetic on run records, the
records as the comparison writes them, and tiny end-to-end runs of the scripts."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, offline_env, randomise_R
from transformers import HfArgumentParser, TrainingArguments, ViTMAEForPreTraining

from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining
from hf_dbp.comparison import mae, runs
from hf_dbp.comparison.analysis import compare, predictors, speedup_curve, summarize
from hf_dbp.comparison.arguments import ComparisonArguments, SweepArguments
from hf_dbp.comparison.machine import run_alone
from hf_dbp.comparison.methods import baseline_of, update_every_of
from hf_dbp.comparison.records import MachineLoad, RunRecord, TrainingLog, read_run
from hf_dbp.comparison.sweep import learning_rate, parse_variant, run_sweep
from hf_dbp.tasks.segmentation.demo import make_demo_ade20k

ROOT = Path(__file__).resolve().parents[1]
RUN_MAE = str(ROOT / "examples" / "run_mae_dbp.py")
RUN_SEGMENTATION = str(ROOT / "examples" / "run_segmentation.py")


def curve(points, **fields) -> RunRecord:
    """A run's record from its evaluations (step, training seconds, eval loss, emissions), `fields` set over it."""
    history = [{"step": s, "train_seconds": t, "eval_loss": loss, "emissions_g": g} for s, t, loss, g in points]
    return dataclasses.replace(RunRecord.from_log_history(history), **fields)


def test_time_saved_is_measured_at_bps_best_loss():
    bp = curve(
        [(10, 10.0, 0.9, 1.0), (20, 20.0, 0.7, 2.0), (30, 30.0, 0.6, 3.0), (40, 40.0, 0.65, 4.0)],
        best_eval_loss=0.6,
        seconds_to_best=30.0,
        emissions_g_to_best=3.0,
        step_of_best=30,
    )
    dbp = curve([(10, 12.0, 0.8, 1.2), (20, 24.0, 0.59, 2.4), (30, 36.0, 0.5, 3.6)])
    result = compare(bp, dbp)
    assert result["dbp_seconds_to_bp_best"] == 24.0  # the first evaluation at or below 0.6
    assert result["dbp_steps_to_bp_best"] == 20
    assert result["steps_saved_fraction"] == pytest.approx(1 - 20 / 30)
    assert result["time_saved_fraction"] == pytest.approx(1 - 24 / 30)
    assert result["emissions_saved_fraction"] == pytest.approx(1 - 2.4 / 3.0)
    never = curve([(10, 12.0, 0.8, 1.2), (20, 24.0, 0.61, 2.4)])
    assert compare(bp, never) == {
        "best_eval_loss_over_bp": pytest.approx(0.61 - 0.6),
        "final_eval_loss_over_bp": pytest.approx(0.61 - 0.65),
        "dbp_steps_to_bp_best": None,
        "dbp_seconds_to_bp_best": None,
        "steps_saved_fraction": None,
        "time_saved_fraction": None,
        "emissions_saved_fraction": None,
    }
    assert summarize([0.2, None, 0.4])["reached"] == "2/3"


def test_speedup_curve_takes_the_baselines_best_within_each_share_of_its_budget():
    """A late plateau of the baseline decides only the last point of the curve."""
    bp = curve([(10, 10.0, 0.9, 0), (20, 20.0, 0.7, 0), (30, 30.0, 0.6, 0), (40, 40.0, 0.59, 0)])
    dbp = curve([(10, 11.0, 0.72, 0), (20, 22.0, 0.6, 0), (30, 33.0, 0.58, 0), (40, 44.0, 0.5, 0)])
    points = speedup_curve(bp, dbp)
    assert [p["fraction"] for p in points] == [0.25, 0.5, 0.75, 1.0]
    assert [p["target_eval_loss"] for p in points] == [0.9, 0.7, 0.6, 0.59]  # best within 10, 20, 30, 40 steps
    assert [p["baseline_step"] for p in points] == [10, 20, 30, 40]
    assert [p["step"] for p in points] == [10, 20, 20, 30]
    assert points[2]["steps_ratio"] == pytest.approx(20 / 30) and points[2]["seconds_ratio"] == pytest.approx(22 / 30)
    slow = speedup_curve(bp, curve([(10, 11.0, 0.95, 0), (40, 44.0, 0.8, 0)]))
    assert slow[0]["step"] == 40 and slow[1]["step"] is None and slow[1]["steps_ratio"] is None


def test_predictors_read_the_early_decorrelation_loss_and_how_soon_bp_flattens():
    train = [
        TrainingLog(step=s, train_seconds=s / 16, loss=1.0, decorrelation_loss=d)
        for s, d in ((16, 0.4), (32, 0.2), (48, 9.0), (64, 9.0))
    ]
    bp = curve([(16, 1.0, 0.9, 0), (32, 2.0, 0.7, 0), (48, 3.0, 0.6, 0), (64, 4.0, 0.595, 0)], train=train)
    assert bp.best_eval_loss == 0.595
    flat = curve([(16, 1.0, 0.7, 0), (32, 2.0, 0.6, 0), (64, 4.0, 0.5999, 0)], best_eval_loss=0.5999, train=[])
    out = predictors([{"bp": bp}, {"bp": flat}], "bp")
    assert out["early_bp_decorrelation_loss"] == [pytest.approx(0.3), None]  # steps 16 and 32 only
    assert out["bp_share_of_budget_to_within_1pct"] == [0.75, 0.5]  # 0.6 <= 1.01 * 0.595 at step 48 of 64


def test_runs_measure_the_cpu_other_processes_took():
    """An idle run has (almost) no CPU of others; a run with a busy neighbour process says so."""
    quiet = run_alone([sys.executable, "-c", "sum(range(3_000_000))"])
    assert quiet.own_cpu_seconds > 0 and quiet.wall_seconds > 0
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = run_alone([sys.executable, "-c", "import time; time.sleep(1.5)"])
    finally:
        neighbour.kill()
        neighbour.wait()
    assert busy.other_cpu_seconds > 0.5 and busy.busy


def test_a_run_record_is_written_as_the_runs_own_records(tmp_path):
    """read_run keeps the evaluations and training records that carry training seconds; comparison.json and
    sweep.json write a record with its fields in order, its machine's load only where it was timed."""
    history = [
        {"step": 2, "train_seconds": 1.5, "loss": 1.2, "decorrelation_loss": 0.3, "learning_rate": 1e-3},
        {"step": 2, "train_seconds": 1.5, "eval_loss": 0.9, "energy_kwh": 1e-6, "emissions_g": 2e-3},
        {"step": 4, "train_seconds": 3.0, "eval_loss": 0.8, "energy_kwh": 2e-6, "emissions_g": 4e-3},
        {"step": 4, "eval_loss": 0.7},
        {"train_runtime": 4.0},
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 4}))
    results = {"train_energy_kwh": 3e-6, "train_emissions_g": 5e-3, "eval_loss": 0.75}  # the final model's
    (tmp_path / "all_results.json").write_text(json.dumps(results))
    record = read_run(str(tmp_path))
    assert record.to_dict() == {
        "evals": [
            {"step": 2, "train_seconds": 1.5, "eval_loss": 0.9, "energy_kwh": 1e-6, "emissions_g": 2e-3},
            {"step": 4, "train_seconds": 3.0, "eval_loss": 0.8, "energy_kwh": 2e-6, "emissions_g": 4e-3},
        ],
        "train": [{"step": 2, "train_seconds": 1.5, "loss": 1.2, "decorrelation_loss": 0.3}],
        "best_eval_loss": 0.8,
        "seconds_to_best": 3.0,
        "step_of_best": 4,
        "energy_kwh_to_best": 2e-6,
        "emissions_g_to_best": 4e-3,
        "energy_kwh": 3e-6,
        "emissions_g": 5e-3,
        "train_seconds": 1.5,
        "final_eval_loss": 0.75,
        "optimizer_steps": 4,
    }
    assert list(record.to_dict()) == [f.name for f in dataclasses.fields(RunRecord)][:-1]  # the JSON's key order
    record.machine = MachineLoad(wall_seconds=4.0, own_cpu_seconds=3.0, other_cpu_fraction=None, busy=None)
    assert record.to_dict()["machine"] == {
        "wall_seconds": 4.0,
        "own_cpu_seconds": 3.0,
        "other_cpu_fraction": None,
        "busy": None,
    }


class Launched:
    """A script started in the background, waited for when a test needs its result."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._result = None

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=600)
            self._result = subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)
        return self._result


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory) -> dict:
    """The two end-to-end runs of this file (a comparison with fine-tuning, a settings sweep), started together, one
    per core: each spends most of its time starting processes, which run side by side."""
    runs = {}
    tmp_path = tmp_path_factory.mktemp("comparison")
    tiny = dict(
        image_size=16,
        patch_size=4,
        hidden_size=24,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )  # 4 blocks: the fewest the neck takes
    torch.manual_seed(0)
    original = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**tiny))
    randomise_R(original, scale=0.1)
    original.save_pretrained(tmp_path / "dbp")
    ade20k = make_demo_ade20k(str(tmp_path / "ade20k"), num_train=4, num_validation=2, size=32, seed=0)
    finetune = (
        "--upernet_hidden_size 16 --auxiliary_channels 8 --crop_size 32 --per_device_train_batch_size 2 "
        "--per_device_eval_batch_size 2 --max_steps 2 --warmup_steps 0 --dataloader_num_workers 0"
    )
    runs["comparison"] = (
        tmp_path,
        original,
        Launched(
            [
                sys.executable,
                str(ROOT / "examples" / "compare_bp_dbp.py"),
                "--output_dir",
                str(tmp_path / "cmp"),
                "--model_name_or_path",
                str(tmp_path / "dbp"),
                "--decorrelation_lr",
                "0",
                "--max_steps",
                "2",
                "--eval_steps",
                "1",
                "--per_device_train_batch_size",
                "8",
                "--max_train_samples",
                "32",
                "--max_eval_samples",
                "8",
                "--emissions_country",
                "FRA",
                "--seeds",
                "0",
                "--demo_photos",
                "alternate",
                "--finetune_data_dir",
                ade20k,
                "--finetune_args",
                finetune,
            ],
            offline_env(tmp_path / "hf"),
        ),
    )
    sweep_path = tmp_path_factory.mktemp("sweep")
    variants = [
        "bp:weight_decay=0,base_learning_rate=1e-2",
        "dbp:decorrelation_lr_schedule=tied,decorrelation_layers=qkv fc1,decorrelation_kappa=0.1",
        # an end-of-schedule share: the DBP variant on 3 of the baseline's 4 steps, off the evaluation interval (2)
        "dbp:decorrelation_lr_schedule=tied,decorrelation_layers=qkv fc1,decorrelation_kappa=0.1,max_steps=3",
    ]
    runs["sweep"] = (
        sweep_path,
        variants,
        Launched(
            sweep_command(sweep_path / "sweep", *variants),
            offline_env(sweep_path / "hf"),
        ),
    )
    return runs


def test_comparison_from_a_dbp_checkpoint_with_finetuning_end_to_end(end_to_end):
    """The real thing, small: BP and DBP from a DBP checkpoint (R far from I) with --decorrelation_lr 0 on the
    alternate photographs, then UperNet fine-tuning of both. The DBP run trains the weights and keeps every R bitwise;
    the BP run starts from the same model with R folded in; the comparison files come from the runs' own records."""
    tmp_path, original, launched = end_to_end["comparison"]
    result = launched.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("embedded alternate demo set") == 2
    matrices = [k for k in original.state_dict() if k.endswith("_decorrelation.R")]
    assert len(matrices) == 1 + 4 * 4
    trained = ViTMAEDBPForPreTraining.from_pretrained(tmp_path / "cmp" / "seed0" / "dbp")
    after, before = trained.state_dict(), original.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in matrices)  # R is DBP's alone
    assert not torch.equal(after["vit.layers.0.mlp.fc1.weight"], before["vit.layers.0.mlp.fc1.weight"])
    bp = ViTMAEForPreTraining.from_pretrained(tmp_path / "cmp" / "seed0" / "bp")
    assert not any(k.endswith("_decorrelation.R") for k in bp.state_dict())
    assert (tmp_path / "cmp" / "seed0" / "bp" / "config.json").read_text().count('"vit_mae"') == 1
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["methods"] == ["bp", "dbp"]
    for method in ("bp", "dbp"):
        run = comparison["runs"][0][method]
        assert [e["step"] for e in run["evals"]] == [1, 2] and run["best_eval_loss"] > 0
        assert comparison[method]["emissions_g"] > 0
        assert 0.0 <= run["mean_iou"] <= 1.0  # fine-tuned with UperNet
        assert (tmp_path / "cmp" / "seed0" / f"{method}-upernet" / "all_results.json").is_file()
    assert set(comparison) >= {"time_saved_fraction", "emissions_saved_fraction", "dbp_seconds_to_bp_best", "summary"}
    assert "| seed |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


def fake_runs(monkeypatch, loss_of) -> list[list[str]]:
    """Replace the comparison's runs by records written at once: `loss_of(method, base_lr, step)` is the eval loss of
    the run `method` ("bp", "dbp", "bp_muon", ...) at that step; 4 steps, evaluated at 2 and 4. Returns the commands
    the comparison gave, in order. The arithmetic and the files the comparison writes are its own."""
    commands = []

    def run_alone(command):
        commands.append(command)
        flag = {
            name: command[i + 1] for i, name in enumerate(command) if name.startswith("--") and i + 1 < len(command)
        }
        method = ("bp" if "--bp_baseline" in command else "dbp") + (
            "" if flag["--matrix_optimizer"] == "adamw" else "_" + flag["--matrix_optimizer"]
        )
        rate, output = float(flag["--base_learning_rate"]), flag["--output_dir"]
        history = [
            {
                "step": step,
                "train_seconds": 1.0 * step,
                "eval_loss": loss_of(method, rate, step),
                "energy_kwh": 1e-6 * step,
                "emissions_g": 1e-3 * step,
            }
            for step in (2, 4)
        ]
        history += [
            {"step": step, "train_seconds": 1.0 * step, "loss": 1.0, "decorrelation_loss": 0.1} for step in (2, 4)
        ]
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "trainer_state.json"), "w") as file:
            json.dump({"log_history": history}, file)
        with open(os.path.join(output, "all_results.json"), "w") as file:
            json.dump({"train_energy_kwh": 4e-6, "train_emissions_g": 4e-3}, file)
        return MachineLoad(wall_seconds=4.0, own_cpu_seconds=4.0, other_cpu_fraction=0.0, busy=False)

    monkeypatch.setattr(runs, "run_alone", run_alone)
    return commands


def test_a_learning_rate_sweep_compares_each_method_at_its_own_best_rate(monkeypatch, tmp_path):
    """--learning_rate_sweep: every method runs at every rate; each is compared at the rate of its lowest best eval
    loss (BP's best is 1e-2 here, DBP's 1e-3), and the comparison's records and files say so."""
    best_rate = {"bp": 1e-2, "dbp": 1e-3}
    commands = fake_runs(
        monkeypatch, lambda method, rate, step: 1.0 / step + (0.0 if rate == best_rate[method] else 0.5)
    )
    args = ComparisonArguments(
        output_dir=str(tmp_path / "cmp"), seeds=[0, 1], learning_rate_sweep=[1e-3, 1e-2], max_steps=4
    )
    mae.run_comparison(args, RUN_MAE, RUN_SEGMENTATION)
    assert len(commands) == 2 * 2 * 2  # seeds x rates x methods
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    sweep = comparison["sweep"]
    assert sweep["chosen"] == best_rate
    assert sweep["best_eval_loss"]["bp"]["0.001"]["mean"] == pytest.approx(0.75)
    for run in comparison["runs"]:
        for method, rate in best_rate.items():
            assert run[method]["base_learning_rate"] == rate and run[method]["best_eval_loss"] == pytest.approx(0.25)
            assert (tmp_path / "cmp" / f"seed{run['seed']}" / f"{method}-lr{rate:g}" / "all_results.json").is_file()
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Learning-rate sweep" in markdown and "(chosen)" in markdown


def test_peer_optimizers_add_a_bp_and_a_dbp_run_each_compared_with_each_other(monkeypatch, tmp_path):
    """--optimizers adamw muon: four methods; each DBP against the BP of its own optimizer, every speed-up curve
    against the first BP, and the markdown shows both pairs."""
    fake_runs(monkeypatch, lambda method, rate, step: 1.0 / step + (0.1 if method.startswith("bp") else -0.2))
    args = ComparisonArguments(output_dir=str(tmp_path / "cmp"), seeds=[0], optimizers=["adamw", "muon"], max_steps=4)
    mae.run_comparison(args, RUN_MAE, RUN_SEGMENTATION)
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["methods"] == ["bp", "dbp", "bp_muon", "dbp_muon"]
    run = comparison["runs"][0]
    fields = {"evals", "best_eval_loss", "step_of_best", "seconds_to_best", "optimizer", "machine"}
    for method in comparison["methods"]:
        assert fields <= set(run[method]) and [e["step"] for e in run[method]["evals"]] == [2, 4], method
    assert run["bp_muon"]["optimizer"] == "muon" and run["dbp"]["optimizer"] == "adamw"
    assert set(run["comparisons"]) == {"dbp", "dbp_muon"}
    assert set(run["speedup_curve"]) == {"dbp", "bp_muon", "dbp_muon"}
    # BP's best is 0.35, at step 4; DBP is at 0.3 by step 2: half the steps and half the seconds, with each optimizer.
    for dbp in ("dbp", "dbp_muon"):
        assert run["comparisons"][dbp]["dbp_steps_to_bp_best"] == 2, dbp
        assert run["comparisons"][dbp]["steps_saved_fraction"] == pytest.approx(0.5)
        assert run["comparisons"][dbp]["time_saved_fraction"] == pytest.approx(0.5)
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "**dbp_muon against bp_muon**" in markdown and "Speed-up curve" in markdown


def run_mae_arguments(command: list[str]):
    """The DBP and training arguments `examples/run_mae_dbp.py` parses from `command` (its script and arguments)."""
    module = load_script("examples/run_mae_dbp.py", "run_mae_dbp_parsed")
    parser = HfArgumentParser(
        (module.ModelArguments, module.DataTrainingArguments, module.DBPArguments, module.CustomTrainingArguments)
    )
    _, _, dbp, training = parser.parse_args_into_dataclasses(args=command[command.index("--output_dir") :])
    return dbp, training


@pytest.mark.parametrize(
    "optimizer, optim, matrices, schedule",
    [
        ("soap", "default", "soap", "cosine"),
        ("muon", "default", "muon", "cosine"),
        ("schedulefree", "schedule_free_adamw", "adamw", "constant"),
    ],
)
def test_each_peer_optimizer_reaches_run_mae_dbp_as_its_flags(tmp_path, optimizer, optim, matrices, schedule):
    if optim == "default":  # AdamW as transformers builds it by default (for the parameters the matrices leave)
        optim = TrainingArguments.__dataclass_fields__["optim"].default
    args = ComparisonArguments(weight_decay=0.1, bp_weight_decay=0.0, decorrelation_lr_schedule="tied")
    for bp in (True, False):
        command = mae.pretraining_command(RUN_MAE, args, 0, bp, str(tmp_path), 1e-3, optimizer)
        dbp_arguments, training = run_mae_arguments(command)
        assert dbp_arguments.bp_baseline == bp
        assert (training.optim, training.matrix_optimizer, training.lr_scheduler_type) == (optim, matrices, schedule)
        assert training.weight_decay == (0.0 if bp else 0.1) and training.decorrelation_lr_schedule == "tied"


@pytest.mark.parametrize("item", ["adamw=1e-3", "lion=1e-3", "soap", "soap=fast", "muon=-1"])
def test_a_bad_peer_learning_rate_is_refused_with_the_arguments(item):
    with pytest.raises(ValueError, match="optimizer_base_learning_rates"):
        ComparisonArguments(optimizer_base_learning_rates=[item])
    assert ComparisonArguments(optimizer_base_learning_rates=["soap=3e-3"]).peer_rates() == {"soap": 3e-3}


TINY_MAE = (
    "image_size=16,patch_size=4,hidden_size=24,num_hidden_layers=2,num_attention_heads=2,intermediate_size=48,"
    "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32"
)


def sweep_command(output_dir: Path, *variants: str) -> list[str]:
    """examples/sweep_bp_dbp.py on the tiny ViT: 4 steps of 8 images, one seed, the given `variants`."""
    return [
        sys.executable,
        str(ROOT / "examples" / "sweep_bp_dbp.py"),
        "--output_dir",
        str(output_dir),
        "--config_overrides",
        TINY_MAE,
        "--max_steps",
        "4",
        "--eval_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "8",
        "--seeds",
        "0",
        "--variants",
        *variants,
    ]


def test_settings_sweep_tunes_bp_and_measures_every_variant_against_the_best_bp(end_to_end):
    tmp_path, variants, launched = end_to_end["sweep"]
    result = launched.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    means = {v: sweep["variants"][v]["mean_best_eval_loss"] for v in variants}
    assert sweep["baseline"] == variants[0]  # the best (here the only) BP variant
    for variant in variants:
        runs = sweep["runs"][variant]
        assert means[variant] == pytest.approx(runs["0"]["best_eval_loss"])  # the mean over the one seed
        for seed in ("0",):
            target = sweep["runs"][sweep["baseline"]][seed]["best_eval_loss"]
            steps = sweep["variants"][variant]["per_seed"][seed]["steps_to_baseline_best"]
            reached = [e["step"] for e in runs[seed]["evals"] if e["eval_loss"] <= target]
            assert steps == (reached[0] if reached else None)
    assert sweep["variants"][sweep["baseline"]]["min_steps_saved_fraction"] == 0.0
    config = ViTMAEDBPConfig.from_pretrained(tmp_path / "sweep" / "variant01" / "seed0")
    assert config.decorrelation_layers == ["qkv", "fc1"] and config.decorrelation_kappa == 0.1
    dbp_arguments, bp = run_mae_arguments(sweep["variants"][variants[0]]["commands"]["0"])
    assert bp.weight_decay == 0.0 and bp.base_learning_rate == 1e-2 and dbp_arguments.bp_baseline
    assert "(baseline)" in (tmp_path / "sweep" / "sweep.md").read_text()
    # The end of each schedule: the final eval loss is the script's evaluation of the final model (all_results.json),
    # also where the budget is no multiple of the evaluation interval, against the baseline's final.
    share = sweep["variants"][variants[2]]
    assert share["optimizer_steps"] == 3 and share["share_of_baseline_steps"] == 0.75
    finals = {
        v: json.loads((tmp_path / "sweep" / f"variant{i:02d}" / "seed0" / "all_results.json").read_text())["eval_loss"]
        for i, v in enumerate(variants)
    }
    assert share["per_seed"]["0"]["final_eval_loss"] == finals[variants[2]]
    assert share["per_seed"]["0"]["final_over_baseline_final"] == pytest.approx(
        finals[variants[2]] - finals[variants[0]]
    )
    assert "| 0.75 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    # benchmarks/scaling.py reads the sweep as one point: the tuned DBP, its share, BP's compute.
    point = load_script("benchmarks/scaling.py").measure_point(str(tmp_path / "sweep"))
    assert (point["bp"], point["dbp"], point["steps"], point["shares_run"]) == (*variants[:2], 4, [0.75, 1.0])
    ended = [s for s, v in ((0.75, variants[2]), (1.0, variants[1])) if finals[v] <= finals[variants[0]]]
    assert point["smallest_share"] == [min(ended) if ended else None]
    assert point["bp_run_flops"] == 4 * point["bp_step_flops"] and point["dbp_step_flops_over_bp"] > 1
    # Rerun with --reuse_runs (a sweep stopped half-way, shrunk or reordered): the finished runs of the same commands
    # are read wherever they sit in the sweep's folder, not rerun, and make the same sweep; a new variant's run goes
    # where another's finished run was, which is kept aside (and still found), not overwritten.
    again = subprocess.run(
        [*sweep_command(tmp_path / "sweep", variants[1], variants[0], "bp:max_steps=2"), "--reuse_runs"],
        cwd=ROOT,
        env=offline_env(tmp_path / "hf"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 2  # and only the new variant ran:
    assert (again.stdout + again.stderr).count("Done:") == 1
    rerun = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert {v: rerun[v] for v in variants[:2]} == {v: sweep["runs"][v] for v in variants[:2]}
    kept = tmp_path / "sweep" / "variant-kept00" / "seed0"
    assert json.loads((kept / "sweep_command.json").read_text()) == sweep["variants"][variants[2]]["commands"]["0"]
    assert rerun["bp:max_steps=2"]["0"]["optimizer_steps"] == 2 and (kept / "all_results.json").is_file()
    assert f"reusing the finished run in {tmp_path / 'sweep' / 'variant01' / 'seed0'}" in again.stdout  # now first


@pytest.mark.parametrize(
    "variant, message",
    [
        ("dbp:decorrelation_lr", "name=value"),
        ("dbp:no_such=1", "name=value"),
        ("adam:weight_decay=0", "the method"),
        ("dbp:seeds=3", "name=value"),
    ],
)
def test_a_bad_sweep_variant_is_refused_before_any_run(monkeypatch, tmp_path, variant, message):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=message):
        run_sweep(SweepArguments(output_dir=str(tmp_path / "sweep"), variants=["bp", variant]), RUN_MAE)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_variants_rate_and_weight_decay_are_the_runs_whatever_the_method():
    base = ComparisonArguments(
        bp_base_learning_rate=3e-3, bp_weight_decay=0.1, optimizer_base_learning_rates=["soap=6e-3"]
    )
    kind, optimizer, args = parse_variant("bp:weight_decay=0,base_learning_rate=1e-2", base)
    rate = learning_rate(kind, optimizer, args)
    assert (kind, optimizer, rate, args.bp_weight_decay) == ("bp", "adamw", 1e-2, None)
    kind, optimizer, args = parse_variant("bp_soap", base)
    assert (optimizer, learning_rate(kind, optimizer, args)) == ("soap", 6e-3)  # the peer's own rate
    kind, optimizer, args = parse_variant("bp", base)
    assert learning_rate(kind, optimizer, args) == 3e-3 and args.optimizers == ["adamw"]


def test_dbp_updating_every_k_steps_is_one_more_record_against_bp(tmp_path):
    args = ComparisonArguments(decorrelation_update_every=[1, 4])
    command = mae.pretraining_command(
        RUN_MAE, args, 0, False, str(tmp_path), 1e-3, "adamw", update_every_of("dbp_every4")
    )
    dbp_arguments, training = run_mae_arguments(command)
    assert not dbp_arguments.bp_baseline and training.decorrelation_update_every == 4
    every_step = mae.pretraining_command(RUN_MAE, args, 0, False, str(tmp_path), 1e-3)
    assert run_mae_arguments(every_step)[1].decorrelation_update_every == 1
    assert baseline_of("dbp_every4") == "bp" and baseline_of("dbp_muon") == "bp_muon"
    with pytest.raises(ValueError, match="decorrelation_update_every"):
        ComparisonArguments(decorrelation_update_every=[0])


def test_a_dbp_that_ends_worse_than_bp_beyond_bps_spread_is_named_per_seed():
    """`worse_than_bp`: the seeds where DBP's best or last eval loss lies above BP's by more than the spread of BP's
    own best over the seeds (what `compare_bp_dbp.py` warns about); the shift ratio is BP's validation loss over its
    training loss within a quarter of its budget."""
    from hf_dbp.comparison.analysis import shift_ratio, worse_than_bp

    def run(seed, bp_curve, dbp_curve):
        bp, dbp = curve(bp_curve), curve(dbp_curve)
        return {"seed": seed, "bp": bp, "dbp": dbp, "comparisons": {"dbp": compare(bp, dbp)}}

    # BP's best: 0.50 and 0.52 (spread 0.02). Seed 0: DBP better. Seed 1: best fine, last 0.05 above BP's last.
    runs = [
        run(0, [(8, 1.0, 0.6, 0), (16, 2.0, 0.5, 0)], [(8, 1.0, 0.55, 0), (16, 2.0, 0.48, 0)]),
        run(1, [(8, 1.0, 0.52, 0), (16, 2.0, 0.53, 0)], [(8, 1.0, 0.51, 0), (16, 2.0, 0.58, 0)]),
    ]
    assert worse_than_bp(runs, "bp", "dbp") == ["seed 1: dbp's last eval loss is 0.0500 above bp's (spread 0.0200)"]
    assert worse_than_bp(runs[:1], "bp", "dbp") == []
    record = curve([(4, 1.0, 0.9, 0), (8, 2.0, 0.6, 0), (16, 4.0, 0.5, 0), (32, 8.0, 0.4, 0)])
    record = dataclasses.replace(
        record, train=[TrainingLog(step=s, train_seconds=s, loss=loss) for s, loss in ((2, 0.8), (6, 0.5), (8, 0.3))]
    )
    assert shift_ratio(record) == pytest.approx(0.6 / 0.4)  # eval at step 8 over the training losses of steps 5-8


def test_the_text_comparison_gives_each_peer_or_each_method_its_own_learning_rate():
    from hf_dbp.comparison.arguments import ClmComparisonArguments
    from hf_dbp.comparison.clm import learning_rates

    methods = ["bp", "dbp", "bp_muon", "dbp_muon"]
    args = ClmComparisonArguments(optimizers=["adamw", "muon"], learning_rate=8e-3, bp_learning_rate=4e-3)
    assert learning_rates(args, methods) == {"bp": 4e-3, "dbp": 8e-3, "bp_muon": 4e-3, "dbp_muon": 8e-3}
    args.optimizer_learning_rates = ["muon=2e-3"]
    assert learning_rates(args, methods) == {"bp": 4e-3, "dbp": 8e-3, "bp_muon": 2e-3, "dbp_muon": 2e-3}
    args.optimizer_learning_rates = ["bp_muon=8e-3", "dbp_muon=4e-3"]  # each tuned on its own
    assert learning_rates(args, methods) == {"bp": 4e-3, "dbp": 8e-3, "bp_muon": 8e-3, "dbp_muon": 4e-3}
    with pytest.raises(ValueError, match="--optimizer_learning_rates takes peer=rate"):
        ClmComparisonArguments(optimizer_learning_rates=["adam=1e-3"])


def scaling_variant(method: str, share: float, finals: list[float], mean_best: float = 0.5) -> dict:
    """One variant of a hand-made sweep.json: its share of BP's steps, its final eval loss per seed."""
    per_seed = {
        str(seed): {"best_eval_loss": mean_best, "steps_saved_fraction": 0.4, "final_eval_loss": final}
        for seed, final in enumerate(finals)
    }
    steps = {"optimizer_steps": round(100 * share), "share_of_baseline_steps": share}
    return {"method": method, **steps, "mean_best_eval_loss": mean_best, "per_seed": per_seed}


def scaling_sweep(batch: int = 8, data: str = "default") -> dict:
    """A hand-made sweep.json of the kind `benchmarks/scaling.py` reads: BP at two rates, DBP at two, shares of the
    tuned DBP and of the other; two seeds."""
    return {
        "baseline": "bp",
        "seeds": [0, 1],
        "settings": {
            "config_overrides": TINY_MAE,
            "per_device_train_batch_size": batch,
            "decorrelation_layers": ["qkv", "fc1"],
            "demo_photos": data,
        },
        "variants": {
            "bp": scaling_variant("bp", 1.0, [0.6, 0.6]),
            # BP's runner-up rate: a worse best mid-run, a lower end in seed 1, which the end of schedule must beat
            "bp:base_learning_rate=1e-3": scaling_variant("bp", 1.0, [0.61, 0.598], mean_best=0.51),
            "dbp:base_learning_rate=1e-3": scaling_variant("dbp", 1.0, [0.59, 0.59], mean_best=0.45),
            "dbp": scaling_variant("dbp", 1.0, [0.58, 0.58]),  # a worse DBP rate: its shares are not the tuned DBP's
            "dbp:max_steps=50": scaling_variant("dbp", 0.5, [0.59, 0.59]),
            "dbp:base_learning_rate=1e-3,max_steps=50": scaling_variant("dbp", 0.5, [0.601, 0.599]),
            "dbp:base_learning_rate=1e-3,max_steps=70": scaling_variant("dbp", 0.7, [0.599, 0.597]),
        },
    }


def test_scaling_reads_the_end_of_schedule_share_per_seed_and_the_trend_per_doubling(tmp_path):
    scaling = load_script("benchmarks/scaling.py")
    sweep = scaling_sweep()
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    point = scaling.measure_point(str(tmp_path))
    assert point["dbp"] == "dbp:base_learning_rate=1e-3" and point["shares_run"] == [0.5, 0.7, 1.0]
    # per seed the smallest share that ended at or below BP's lowest final (seed 1: the runner-up's 0.598, which
    # share 0.5's 0.599 misses); in every seed, the largest of those
    assert point["bp_final_eval_loss"] == [0.6, 0.598]
    assert point["smallest_share"] == [0.7, 0.7] and point["smallest_share_every_seed"] == 0.7
    assert point["end_of_schedule_saved"] == pytest.approx(0.3) and point["min_steps_saved"] == 0.4
    ratio = point["dbp_step_flops_over_bp"]  # what a user pays: DBP's steps at DBP's FLOPs per step
    assert point["min_compute_saved"] == pytest.approx(1 - 0.6 * ratio) and 1 < ratio < 2
    assert point["end_of_schedule_compute_saved"] == pytest.approx(1 - 0.7 * ratio)
    sweep["settings"]["per_device_train_batch_size"] = 16  # the compute grows with the batch, as it should
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert scaling.measure_point(str(tmp_path))["bp_run_flops"] == 2 * point["bp_run_flops"]

    points = [{"bp_run_flops": 2.0**k, "gain": 0.6 - 0.1 * (k - 10)} for k in (10, 11, 12)]
    shrinking = scaling.trend(points, "gain")
    assert shrinking["per_doubling"] == pytest.approx(-0.1) and shrinking["zero_at_flops"] == pytest.approx(2.0**16)
    assert shrinking["zero_doublings_past_largest"] == pytest.approx(4)
    assert scaling.trend([{**p, "gain": -p["gain"]} for p in points], "gain")["zero_at_flops"] is None  # grows
    assert scaling.trend(points[:1], "gain") is None


def test_scaling_writes_tables_trends_and_plot_from_sweep_folders_and_refuses_a_folder_without_a_sweep(
    tmp_path, monkeypatch, capsys
):
    """The script as a user runs it: two sizes of one axis (the larger batch standing in for a larger model) and a
    held-out point, which is tabled and plotted but fitted into no trend."""
    scaling = load_script("benchmarks/scaling.py")
    folders = {"small": scaling_sweep(8), "large": scaling_sweep(16), "heldout": scaling_sweep(8, "heldout_photos")}
    for name, sweep in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps(sweep))
    out = tmp_path / "out"
    argv = ["scaling.py", "--sizes", str(tmp_path / "small"), str(tmp_path / "large"), "--more"]
    monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path / "heldout"), "--output_dir", str(out)])
    scaling.main()
    written = json.loads((out / "scaling.json").read_text())
    assert [p["data"] for p in written["points"]] == ["default", "default", "heldout_photos"]
    assert list(written["trends"]) == ["model size"]  # the held-out point is on no axis
    size = written["trends"]["model size"]
    assert size["min_steps_saved"]["points"] == 2 and size["min_steps_saved"]["per_doubling"] == pytest.approx(0)
    table = (out / "scaling.md").read_text()
    assert table.count("| 24 x 2 |") == 3 and "| model size | steps saved to BP's best (min over seeds) | 2 |" in table
    assert (out / "scaling.png").stat().st_size > 10_000 and "scaling.png" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", ["scaling.py", "--sizes", str(tmp_path / "small"), str(tmp_path)])
    with pytest.raises(SystemExit):
        scaling.main()
    assert f"{tmp_path} holds no sweep.json" in capsys.readouterr().err
