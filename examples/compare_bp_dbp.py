#!/usr/bin/env python
"""BP-MAE against DBP-MAE on the same data, seed, model, schedule and budget: time to the baseline's loss, energy.

    python examples/compare_bp_dbp.py                                     # offline, embedded natural images
    python examples/compare_bp_dbp.py --train_dir imgs/train --validation_dir imgs/val --seeds 0 1 2 \\
        --max_train_minutes 60 --output_dir outputs/compare
    python examples/compare_bp_dbp.py ... --finetune_data_dir ADEChallengeData2016   # then UperNet mIoU of both

Each run is `examples/run_mae_dbp.py` itself (DBP, and the same with `--bp_baseline`), one after the other so that
their timings do not disturb each other. Both evaluate the validation loss every `--eval_steps` optimizer steps;
time is training time (`train_seconds`: wall clock without evaluation), the same measure for both. Writes
`comparison.json`, `comparison.md` and `comparison.png` to `--output_dir`.

`time_saved_fraction` = 1 - (DBP's seconds to BP's best eval loss) / (BP's seconds to its best), null when DBP
never reaches it; `steps_saved_fraction` the same in optimizer steps (deterministic for a seed);
`emissions_saved_fraction` likewise with the emissions at those points. `speedup_curve`: the steps and seconds each
method needs to reach BP's best eval loss within 25%, 50%, 75% and 100% of BP's budget. Each validation image keeps
one mask for all evaluations (see `hf_dbp.tasks.image_data.fixed_mask_noise`), so the curves move with the weights only. Each
run records the CPU that other processes took while it ran, and is marked busy above 5% (its seconds are then no
figure; its steps still are).

Peers: `--optimizers adamw muon soap schedulefree` runs BP and DBP with each optimizer (records `bp`, `dbp`,
`bp_muon`, `dbp_muon`, `bp_soap`, ...), and compares each DBP with the BP of its own optimizer: torch's Muon and
pytorch-optimizer's SOAP on the hidden matrices (AdamW on the rest), transformers' schedule-free AdamW (its own
warm-up, no schedule).

Tuning both methods alike: `--learning_rate_sweep 5e-4 1e-3 1.5e-3 3e-3` runs BP and DBP at every base learning
rate and seed, compares each method at its own best rate (lowest mean best eval loss over the seeds), and reports
the whole sweep; `examples/sweep_bp_dbp.py` sweeps every other setting (weight decay, the decorrelation lr and its
schedule, kappa, the sample fraction, the layer kinds) of both. `--demo_photos alternate` repeats the comparison on
other embedded photographs, `--demo_photos heldout_photos` (`heldout_faces`, `heldout_terrain`) on sets nothing was
tuned on.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_dbp.tasks.image_data import DEMO_SETS
from hf_dbp.training.optimizers import MATRIX_OPTIMIZERS
from hf_dbp.training.training_args import DECORRELATION_LR_SCHEDULES

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = (*MATRIX_OPTIMIZERS, "schedulefree")
"""`--optimizers`: the matrix optimizers of `hf_dbp.training.optimizers`, and transformers' schedule-free AdamW (`--optim
schedule_free_adamw`, its own warm-up, a constant schedule)."""
DEMO_MODEL = (
    "image_size=32,patch_size=4,hidden_size=96,num_hidden_layers=4,num_attention_heads=4,intermediate_size=384,"
    "decoder_hidden_size=64,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,decoder_intermediate_size=256"
)


@dataclass
class ComparisonArguments:
    output_dir: str = field(default="outputs/compare-bp-dbp", metadata={"help": "Where both runs and the comparison go."})
    train_dir: str | None = field(default=None, metadata={"help": "Folder of training images (default: the embedded demo set)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Folder of validation images."})
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name or local folder instead of the image folders."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column of --dataset_name."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many validation images."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One BP and one DBP run per seed."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start both from this checkpoint (default: from scratch)."})
    config_overrides: str = field(default=DEMO_MODEL, metadata={"help": "The model trained from scratch."})
    num_train_epochs: float = field(default=8, metadata={"help": "Budget in epochs..."})
    max_steps: int = field(default=-1, metadata={"help": "...or in optimizer steps..."})
    max_train_minutes: float | None = field(default=None, metadata={"help": "...or in minutes of training, each run."})
    eval_steps: int = field(default=8, metadata={"help": "Evaluate every this many optimizer steps (often, so that the step resolution does not decide the figures)."})
    per_device_train_batch_size: int = field(default=64)
    base_learning_rate: float = field(default=1.5e-3, metadata={"help": "MAE lr = base x batch / 256, for DBP..."})
    bp_base_learning_rate: float | None = field(default=3e-3, metadata={"help": "...and for BP, tuned separately (3e-3: the best of examples/sweep_bp_dbp.py on the default set; empty: the same as DBP)."})
    learning_rate_sweep: list[float] | None = field(default=None, metadata={"help": "Base learning rates to try for both BP and DBP (replaces the two above): each method is compared at its best one, the lowest mean best eval loss over the seeds."})
    demo_photos: str = field(default="default", metadata={"help": "Without data of yours: the embedded 'default' photographs, the 'alternate' set, or a held-out set: 'heldout_photos', 'heldout_faces', 'heldout_terrain'.", "choices": list(DEMO_SETS)})
    warmup_steps: float = field(default=20)
    decorrelation_lr: float = field(default=3e-3, metadata={"help": "R's learning rate (3e-3 with the tied schedule: the best of examples/sweep_bp_dbp.py on the default set)."})
    decorrelation_kappa: float = field(default=1e-2)
    decorrelation_sample_fraction: float = field(default=0.1)
    decorrelation_layers: list[str] = field(default_factory=lambda: ["patch_embeddings", "qkv", "o_proj", "fc1", "fc2"])
    decorrelation_variance_form: str = field(default="rows", metadata={"help": "'rows' (diag(v) R) or 'columns' (R diag(v), the reference code)."})
    decorrelation_lr_schedule: str = field(default="tied", metadata={"help": "'constant', or 'tied' to the weights' warm-up and cosine decay.", "choices": list(DECORRELATION_LR_SCHEDULES)})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW's (and every peer's) weight decay, for DBP..."})
    bp_weight_decay: float | None = field(default=None, metadata={"help": "...and for BP if tuned separately (default: the same)."})
    optimizers: list[str] = field(default_factory=lambda: ["adamw"], metadata={"help": "Run BP and DBP with each: 'adamw', 'muon' (torch.optim.Muon on the hidden matrices, AdamW on the rest), 'soap' (pytorch-optimizer's SOAP on them), 'schedulefree' (transformers' schedule_free_adamw). Records: bp, dbp, bp_muon, dbp_muon, ...", "choices": list(OPTIMIZERS)})
    optimizer_base_learning_rates: list[str] = field(default_factory=lambda: ["muon=1.5e-3", "soap=3e-3", "schedulefree=3e-3"], metadata={"help": "optimizer=rate each (e.g. 'soap=3e-3'): the base learning rate of BP and DBP with that peer, where its own tuning chose another than --base_learning_rate."})
    muon_lr_multiplier: float = field(default=4.0, metadata={"help": "Muon's learning rate over AdamW's (its updates are scaled to AdamW's RMS)."})
    emissions_country: str | None = field(default=None, metadata={"help": "ISO alpha-3 country for the CO2 figures."})
    decorrelation_update_every: list[int] = field(default_factory=lambda: [1], metadata={"help": "Also run DBP (AdamW) with R updated every k optimizer steps, for each k > 1 here: records dbp_every<k>, compared against bp (a k-th of DBP's traffic between processes; what it costs in convergence)."})
    finetune_data_dir: str | None = field(default=None, metadata={"help": "ADE20K-layout folder: fine-tune both with UperNet."})
    finetune_dataset_name: str | None = field(default=None, metadata={"help": "Or a Hub/parquet dataset for it."})
    finetune_args: str = field(default="", metadata={"help": "More flags for run_segmentation.py, e.g. '--max_steps 2000'."})

    def __post_init__(self) -> None:
        self.peer_rates()  # checked before anything runs
        if any(not (isinstance(k, int) and k >= 1) for k in self.decorrelation_update_every):
            raise ValueError(f"--decorrelation_update_every takes integers >= 1, got {self.decorrelation_update_every}")

    def peer_rates(self) -> dict[str, float]:
        """`--optimizer_base_learning_rates` as {peer: base learning rate}."""
        rates = {}
        for item in self.optimizer_base_learning_rates:
            name, _, rate = item.partition("=")
            try:
                rates[name] = float(rate)
            except ValueError:
                rates[name] = None
            if name not in OPTIMIZERS[1:] or rates[name] is None or not rates[name] > 0:
                raise ValueError(f"--optimizer_base_learning_rates takes peer=rate with a peer of "
                                 f"{list(OPTIMIZERS[1:])} and a rate > 0, got {item!r}")  # fmt: skip
        return rates


def update_every_of(method: str) -> int:
    """k of a `dbp_every<k>` record (R updated every k optimizer steps), 1 for every other method."""
    return int(method[len("dbp_every"):]) if method.startswith("dbp_every") else 1


def baseline_of(dbp: str) -> str:
    """The BP record a DBP record is compared against: the BP run with its optimizer (bp for dbp_every<k>)."""
    return "bp" if update_every_of(dbp) > 1 else "bp" + dbp[len("dbp"):]


def method_names(optimizer: str) -> tuple[str, str]:
    """The records of BP and DBP with `optimizer`: bp and dbp with AdamW, bp_<optimizer> and dbp_<optimizer> else."""
    return ("bp", "dbp") if optimizer == "adamw" else (f"bp_{optimizer}", f"dbp_{optimizer}")


def pretraining_command(args: ComparisonArguments, seed: int, bp: bool, output_dir: str, base_lr: float,
                        optimizer: str = "adamw", update_every: int = 1) -> list[str]:  # fmt: skip
    command = [sys.executable, os.path.join(HERE, "run_mae_dbp.py"), "--output_dir", output_dir, "--seed", str(seed),
               "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps), "--logging_steps", str(args.eval_steps),
               "--save_strategy", "no", "--report_to", "none", "--norm_pix_loss", "true",
               "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--per_device_eval_batch_size", "128",
               "--num_train_epochs", str(args.num_train_epochs), "--max_steps", str(args.max_steps),
               "--base_learning_rate", str(base_lr),
               "--weight_decay", str(args.bp_weight_decay if bp and args.bp_weight_decay is not None else args.weight_decay),
               "--adam_beta2", "0.95", "--warmup_steps", str(args.warmup_steps), "--dataloader_num_workers", "0",
               "--disable_tqdm", "true", "--decorrelation_lr_schedule", args.decorrelation_lr_schedule,
               "--decorrelation_lr", str(args.decorrelation_lr), "--decorrelation_kappa", str(args.decorrelation_kappa),
               "--decorrelation_sample_fraction", str(args.decorrelation_sample_fraction),
               "--decorrelation_variance_form", args.decorrelation_variance_form,
               "--decorrelation_layers", *args.decorrelation_layers,
               "--muon_lr_multiplier", str(args.muon_lr_multiplier)]  # fmt: skip
    if optimizer == "schedulefree":  # warm-up inside the optimizer, and no schedule: that is the point of it
        command += ["--optim", "schedule_free_adamw", "--lr_scheduler_type", "constant", "--matrix_optimizer", "adamw"]
    else:
        command += ["--lr_scheduler_type", "cosine", "--matrix_optimizer", optimizer]
    for flag in ("train_dir", "validation_dir", "dataset_name", "image_column_name", "max_train_samples",
                 "max_eval_samples", "model_name_or_path", "max_train_minutes", "emissions_country"):  # fmt: skip
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    if args.model_name_or_path is None:
        command += ["--config_overrides", args.config_overrides]
    if args.train_dir is None and args.dataset_name is None:
        command += ["--demo_photos", args.demo_photos]
    if bp:
        command.append("--bp_baseline")
    if update_every > 1:
        command += ["--decorrelation_update_every", str(update_every)]
    return command


def read_run(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "trainer_state.json")) as file:
        history = json.load(file)["log_history"]
    with open(os.path.join(output_dir, "all_results.json")) as file:
        results = json.load(file)
    evals = [r for r in history if "eval_loss" in r and "train_seconds" in r]
    train = [r for r in history if "loss" in r and "train_seconds" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    return {
        "evals": [{k: r.get(k) for k in ("step", "train_seconds", "eval_loss", "energy_kwh", "emissions_g")} for r in evals],
        "train": [{k: r.get(k) for k in ("step", "train_seconds", "loss", "decorrelation_loss")} for r in train],
        "best_eval_loss": best["eval_loss"], "seconds_to_best": best["train_seconds"], "step_of_best": best["step"],
        "energy_kwh_to_best": best.get("energy_kwh"), "emissions_g_to_best": best.get("emissions_g"),
        "energy_kwh": results.get("train_energy_kwh"), "emissions_g": results.get("train_emissions_g"),
        "train_seconds": train[-1]["train_seconds"] if train else None,
    }  # fmt: skip


def first_reaching(evals: list[dict], target: float) -> dict | None:
    """The first evaluation at or below `target` (the eval losses are measured on fixed masks)."""
    return next((r for r in evals if r["eval_loss"] <= target), None)


def compare(bp: dict, dbp: dict) -> dict:
    """DBP's optimizer steps, seconds (and emissions) to BP's best eval loss, and the fractions saved: steps are
    deterministic for a seed, seconds are what a user pays."""
    reached = first_reaching(dbp["evals"], bp["best_eval_loss"])
    out = {"dbp_steps_to_bp_best": None, "dbp_seconds_to_bp_best": None, "steps_saved_fraction": None,
           "time_saved_fraction": None, "emissions_saved_fraction": None}  # fmt: skip
    if reached is not None:
        out["dbp_steps_to_bp_best"] = reached["step"]
        out["dbp_seconds_to_bp_best"] = reached["train_seconds"]
        out["steps_saved_fraction"] = 1 - reached["step"] / bp["step_of_best"]
        out["time_saved_fraction"] = 1 - reached["train_seconds"] / bp["seconds_to_best"]
        if reached.get("emissions_g") is not None and bp.get("emissions_g_to_best"):
            out["emissions_saved_fraction"] = 1 - reached["emissions_g"] / bp["emissions_g_to_best"]
    return out


CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def speedup_curve(baseline: dict, other: dict) -> list[dict]:
    """For targets = the baseline's best eval loss within 25%, 50%, 75% and 100% of its budget (in steps): the steps
    and seconds each needs to reach it, and their ratios (other / baseline; below 1 is faster). A late plateau of the
    baseline decides only the last point."""
    budget = max(r["step"] for r in baseline["evals"])
    points = []
    for fraction in CURVE_FRACTIONS:
        seen = [r for r in baseline["evals"] if r["step"] <= fraction * budget] or baseline["evals"][:1]
        target = min(r["eval_loss"] for r in seen)
        base, mine = first_reaching(baseline["evals"], target), first_reaching(other["evals"], target)
        point = {"fraction": fraction, "target_eval_loss": target, "baseline_step": base["step"],
                 "baseline_seconds": base["train_seconds"], "step": None, "seconds": None, "steps_ratio": None,
                 "seconds_ratio": None}  # fmt: skip
        if mine is not None:
            point.update(step=mine["step"], seconds=mine["train_seconds"], steps_ratio=mine["step"] / base["step"],
                         seconds_ratio=mine["train_seconds"] / base["train_seconds"] if base["train_seconds"] else None)  # fmt: skip
        points.append(point)
    return points


EARLY_STEPS = 32
"""What a user sees early in a BP run: its records up to this step."""


def predictors(runs: list[dict], bp: str) -> dict:
    """What a user can measure on their data before DBP's result is known, per seed: the decorrelation loss that the
    BP run reports in its first `EARLY_STEPS` steps (the mean of those records), and the share of BP's budget at
    which its eval loss came within 1% of its best (small: BP flattens early and leaves little to catch up with)."""
    out = {"early_bp_decorrelation_loss": [], "bp_share_of_budget_to_within_1pct": []}
    for run in runs:
        early = [t["decorrelation_loss"] for t in run[bp]["train"] if t["step"] <= EARLY_STEPS and t.get("decorrelation_loss") is not None]
        out["early_bp_decorrelation_loss"].append(statistics.mean(early) if early else None)
        evals, best = run[bp]["evals"], run[bp]["best_eval_loss"]
        near = first_reaching(evals, best * 1.01)
        out["bp_share_of_budget_to_within_1pct"].append(near["step"] / max(r["step"] for r in evals))
    return out


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine has used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as file:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, file.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_alone(command: list[str]) -> dict:
    """Run `command` and measure how much CPU other processes took meanwhile: the machine's busy CPU seconds less
    the run's own (and its children's). A timing taken while others used the CPU is not a figure."""
    busy, own, start = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(command, check=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_seconds = (after.ru_utime - own.ru_utime) + (after.ru_stime - own.ru_stime)
    if busy is None:
        return {"wall_seconds": wall, "own_cpu_seconds": own_seconds, "other_cpu_fraction": None, "busy": None}
    others = max(0.0, _busy_cpu_seconds() - busy - own_seconds)
    fraction = others / (wall * (os.cpu_count() or 1))
    return {"wall_seconds": wall, "own_cpu_seconds": own_seconds, "other_cpu_seconds": others,
            "other_cpu_fraction": fraction, "busy": fraction > BUSY_FRACTION}  # fmt: skip


BUSY_FRACTION = 0.05
"""A run during which other processes used more than this share of the machine's CPU time is marked busy."""


def finetune(args: ComparisonArguments, checkpoint: str, output_dir: str) -> float | None:
    if args.finetune_data_dir is None and args.finetune_dataset_name is None:
        return None
    command = [sys.executable, os.path.join(HERE, "run_segmentation.py"), "--model_name_or_path", checkpoint,
               "--output_dir", output_dir, "--report_to", "none", "--save_strategy", "no"]  # fmt: skip
    command += ["--data_dir", args.finetune_data_dir] if args.finetune_data_dir else ["--dataset_name", args.finetune_dataset_name]
    command += args.finetune_args.split()
    subprocess.run(command, check=True)
    with open(os.path.join(output_dir, "all_results.json")) as file:
        return json.load(file)["eval_mean_iou"]


def summarize(values: list) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "std": None, "min": None, "max": None, "reached": f"0/{len(values)}"}
    return {"mean": statistics.mean(known), "std": statistics.stdev(known) if len(known) > 1 else 0.0,
            "min": min(known), "max": max(known), "reached": f"{len(known)}/{len(values)}"}  # fmt: skip


def _fmt(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_markdown(path: str, result: dict) -> None:
    fmt, runs, methods = _fmt, result["runs"], result.get("methods", ["bp", "dbp"])
    lines = []
    for dbp, summary in result["summary"]["comparisons"].items():
        bp = baseline_of(dbp)
        lines += [f"**{dbp} against {bp}** (steps and training seconds to {bp}'s best eval loss; busy: other processes "
                  "took CPU during a run, its seconds are then no figure)", "",
                  f"| seed | {bp} best eval loss | {bp} step of best | {bp} s to best | {dbp} best eval loss | "
                  f"{dbp} steps to it | {dbp} s to it | steps saved | time saved | emissions saved | {bp} g CO2 | "
                  f"{dbp} g CO2 | busy |", "|" + " --- |" * 13]  # fmt: skip
        for run in runs:
            b, d, c = run[bp], run[dbp], run["comparisons"][dbp]
            busy = [m for m in (bp, dbp) if run[m].get("machine", {}).get("busy")]
            lines.append(f"| {run['seed']} | {fmt(b['best_eval_loss'])} | {b['step_of_best']} | "
                         f"{fmt(b['seconds_to_best'], 3)} | {fmt(d['best_eval_loss'])} | {fmt(c['dbp_steps_to_bp_best'])} | "
                         f"{fmt(c['dbp_seconds_to_bp_best'], 3)} | {fmt(c['steps_saved_fraction'], 3)} | "
                         f"{fmt(c['time_saved_fraction'], 3)} | {fmt(c['emissions_saved_fraction'], 3)} | "
                         f"{fmt(b['emissions_g'], 3)} | {fmt(d['emissions_g'], 3)} | {', '.join(busy) or 'no'} |")  # fmt: skip
        steps, time_ = summary["steps_saved_fraction"], summary["time_saved_fraction"]
        lines += ["", f"Over seeds: steps saved min {fmt(steps['min'], 3)}, mean {fmt(steps['mean'], 3)}; time saved "
                  f"min {fmt(time_['min'], 3)}, mean {fmt(time_['mean'], 3)}, std {fmt(time_['std'], 3)}, max "
                  f"{fmt(time_['max'], 3)} ({dbp} reached {bp}'s best in {time_['reached']} seeds).", ""]  # fmt: skip
    if runs and runs[0].get("speedup_curve"):
        baseline = next(m for m in methods if m not in runs[0]["speedup_curve"])
        lines += [f"**Speed-up curve** against {baseline}: steps and seconds to {baseline}'s best eval loss within 25%, "
                  f"50%, 75% and 100% of its budget, as ratios to {baseline}'s (below 1 is faster; per seed, then the "
                  "worst over seeds)", "", "| method | " + " | ".join(f"{f:.0%} steps | {f:.0%} seconds"
                                                                 for f in CURVE_FRACTIONS) + " |",
                  "|" + " --- |" * (1 + 2 * len(CURVE_FRACTIONS))]  # fmt: skip
        for method in runs[0]["speedup_curve"]:
            cells = []
            for i in range(len(CURVE_FRACTIONS)):
                for key in ("steps_ratio", "seconds_ratio"):
                    values = [run["speedup_curve"][method][i][key] for run in runs]
                    worst = "never" if None in values else fmt(max(values), 3)
                    cells.append(" / ".join("never" if v is None else fmt(v, 3) for v in values) + f" (worst {worst})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(run[m].get("mean_iou") is not None for run in runs for m in methods):
        lines += ["| seed | " + " | ".join(f"{m} mIoU (UperNet)" for m in methods) + " |", "|" + " --- |" * (1 + len(methods))]
        lines += [f"| {run['seed']} | " + " | ".join(fmt(run[m].get("mean_iou")) for m in methods) + " |" for run in runs]
        lines.append("")
    predicted = result["summary"].get("predictors")
    if predicted:
        lines += [f"What a user sees early (per seed): the decorrelation loss the BP run reports in its first {EARLY_STEPS} "
                  "steps " + " / ".join(fmt(v, 3) for v in predicted["early_bp_decorrelation_loss"]) + "; the share of "
                  "BP's budget after which its eval loss was within 1% of its best "
                  + " / ".join(fmt(v, 2) for v in predicted["bp_share_of_budget_to_within_1pct"]) + ".", ""]  # fmt: skip
    sweep = result.get("sweep")
    if sweep:
        lines += ["Learning-rate sweep (best eval loss, mean ± std over seeds; each method compared at its best):",
                  "", "| base lr | " + " | ".join(methods) + " |", "|" + " --- |" * (1 + len(methods))]  # fmt: skip
        for lr in sweep["learning_rates"]:
            cells = []
            for method in methods:
                s = sweep["best_eval_loss"][method][f"{lr:g}"]
                mark = " (chosen)" if sweep["chosen"][method] == lr else ""
                cells.append(f"{fmt(s['mean'])} ± {fmt(s['std'], 2)}{mark}")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    with open(path, "w") as file:
        file.write("\n".join(lines).rstrip() + "\n")


COLORS = {"bp": "tab:blue", "dbp": "tab:orange", "bp_muon": "tab:green", "dbp_muon": "tab:red", "bp_soap": "tab:purple",
          "dbp_soap": "tab:brown", "bp_schedulefree": "tab:gray", "dbp_schedulefree": "tab:olive",
          "dbp_every2": "tab:pink", "dbp_every4": "tab:cyan"}  # fmt: skip


def plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in result["runs"]:
        for method in result.get("methods", ["bp", "dbp"]):
            r, color = run[method], COLORS.get(method)
            label = f"{method} seed {run['seed']}"
            alpha = 1.0 if run is result["runs"][0] else 0.45
            axes[0].plot([e["train_seconds"] for e in r["evals"]], [e["eval_loss"] for e in r["evals"]], "o-",
                         color=color, alpha=alpha, label=label, markersize=3)  # fmt: skip
            axes[1].plot([e["step"] for e in r["evals"]], [e["eval_loss"] for e in r["evals"]], "o-", color=color,
                         alpha=alpha, markersize=3)  # fmt: skip
            axes[1].plot([t["step"] for t in r["train"]], [t["loss"] for t in r["train"]], ":", color=color, alpha=alpha)
            axes[2].plot([t["step"] for t in r["train"]], [t["decorrelation_loss"] for t in r["train"]], color=color,
                         alpha=alpha, label=label)  # fmt: skip
    axes[0].set(xlabel="training seconds", ylabel="eval loss", title="Eval loss against wall-clock")
    axes[1].set(xlabel="optimizer step", ylabel="loss", title="Eval (o-) and train (:) loss against steps")
    axes[2].set(xlabel="optimizer step", ylabel="decorrelation loss", title="Decorrelation loss", yscale="log")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_every_run(output_dir: str, seeds: list[int], methods: list[str], rates: dict[str, float], sweep: list[float],
                    command) -> dict:  # fmt: skip
    """Every (seed, learning rate, method), one after the other so that their timings do not overlap: `command(seed,
    method, output_dir, rate)` is the run's command line. Each at its rate of `rates`, or at every rate of `sweep`.
    Returns {(seed, method, rate): (output folder, its record with the machine's load during the run)}."""
    trained = {}
    for seed in seeds:
        for lr in sweep or [None]:
            for method in methods:
                rate = rates[method] if lr is None else lr
                output = os.path.join(output_dir, f"seed{seed}", method if lr is None else f"{method}-lr{lr:g}")
                print(f"== seed {seed}: {method}, learning rate {rate:g} -> {output}", flush=True)
                machine = run_alone(command(seed, method, output, rate))
                if machine["busy"]:
                    print(f"WARNING: other processes used {machine['other_cpu_fraction']:.0%} of the CPU during this "
                          "run: its seconds are not a figure (its steps are).", flush=True)  # fmt: skip
                trained[seed, method, rate] = (output, read_run(output) | {"machine": machine})
    return trained


def choose_learning_rates(methods: list[str], seeds: list[int], sweep: list[float], best_eval_loss) -> dict:
    """Each method's best rate of `sweep`: the lowest mean over `seeds` of `best_eval_loss(seed, method, rate)`. Returns
    the sweep's record: the rates, each method's chosen one, and its losses (mean, std, ...) at every rate."""
    result = {"learning_rates": sweep, "chosen": {}, "best_eval_loss": {}}
    for method in methods:
        losses = {lr: [best_eval_loss(seed, method, lr) for seed in seeds] for lr in sweep}
        result["best_eval_loss"][method] = {f"{lr:g}": summarize(values) for lr, values in losses.items()}
        result["chosen"][method] = min(sweep, key=lambda lr, losses=losses: statistics.mean(losses[lr]))
    return result


def write_comparison(output_dir: str, result: dict) -> None:
    """comparison.json, comparison.md (printed too) and comparison.png in `output_dir`."""
    with open(os.path.join(output_dir, "comparison.json"), "w") as file:
        json.dump(result, file, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    write_markdown(os.path.join(output_dir, "comparison.md"), result)
    plot(os.path.join(output_dir, "comparison.png"), result)
    print(open(os.path.join(output_dir, "comparison.md")).read())
    print(f"Written: {output_dir}/comparison.json, comparison.md, comparison.png")


def parse_arguments(arguments_class: type):
    """One dataclass of arguments from the command line, or from a JSON/YAML file given as the only argument."""
    parser = HfArgumentParser(arguments_class)
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if sys.argv[1].endswith(".json") else parser.parse_yaml_file
        (args,) = loader(os.path.abspath(sys.argv[1]))
    else:
        (args,) = parser.parse_args_into_dataclasses()
    return args


def main() -> None:
    args = parse_arguments(ComparisonArguments)
    os.makedirs(args.output_dir, exist_ok=True)
    pairs = [method_names(optimizer) for optimizer in dict.fromkeys(args.optimizers)]  # (bp_x, dbp_x) per optimizer
    methods = [method for pair in pairs for method in pair]
    optimizer_of = {method: optimizer for optimizer in dict.fromkeys(args.optimizers) for method in method_names(optimizer)}
    for k in dict.fromkeys(args.decorrelation_update_every):
        if k > 1:  # DBP with AdamW, R updated every k steps, against bp
            pairs.append(("bp", f"dbp_every{k}"))
            optimizer_of[f"dbp_every{k}"] = "adamw"
    methods = list(dict.fromkeys(method for pair in pairs for method in pair))
    rates = {m: (args.bp_base_learning_rate or args.base_learning_rate) if m.startswith("bp") else args.base_learning_rate
             for m in methods}  # fmt: skip
    for name, rate in args.peer_rates().items():  # a peer tuned on its own: both its BP and its DBP at its rate
        for method in method_names(name):
            if method in rates:
                rates[method] = rate
    sweep = args.learning_rate_sweep or []
    def command(seed, method, output, base_lr):
        return pretraining_command(args, seed, method.startswith("bp"), output, base_lr, optimizer_of[method],
                                   update_every_of(method))  # fmt: skip

    trained = train_every_run(args.output_dir, args.seeds, methods, rates, sweep, command)
    sweep_result = None
    if sweep:  # each method at its own best rate: the baselines are tuned exactly as carefully as DBP
        sweep_result = choose_learning_rates(methods, args.seeds, sweep, lambda s, m, lr: trained[s, m, lr][1]["best_eval_loss"])
        rates.update(sweep_result["chosen"])
    runs = []
    for seed in args.seeds:
        run = {"seed": seed}
        for method in methods:
            output, run[method] = trained[seed, method, rates[method]]
            run[method]["base_learning_rate"] = rates[method]
            run[method]["optimizer"] = optimizer_of[method]
            run[method]["mean_iou"] = finetune(args, output, output + "-upernet")
        # Each DBP against the BP with its own optimizer; every method's speed-up curve against the first BP.
        run["comparisons"] = {dbp: compare(run[bp], run[dbp]) for bp, dbp in pairs}
        run["speedup_curve"] = {m: speedup_curve(run[pairs[0][0]], run[m]) for m in methods if m != pairs[0][0]}
        run["comparison"] = run["comparisons"][pairs[0][1]]
        runs.append(run)
    keys = ("steps_saved_fraction", "time_saved_fraction", "emissions_saved_fraction")
    summary = {key: summarize([r["comparison"][key] for r in runs]) for key in keys}
    summary["comparisons"] = {dbp: {key: summarize([r["comparisons"][dbp][key] for r in runs]) for key in keys}
                              for _, dbp in pairs}  # fmt: skip
    summary["busy_runs"] = sum(bool(r[m]["machine"]["busy"]) for r in runs for m in methods)
    summary["predictors"] = predictors(runs, pairs[0][0])
    first_bp, first_dbp = pairs[0]
    result = {"settings": {k: v for k, v in vars(args).items()}, "methods": methods, "runs": runs, "summary": summary,
              "sweep": sweep_result,
              # the first seed's figures also at the top level, where a reader of a one-seed comparison looks first
              "bp": runs[0][first_bp] | {"evals": None, "train": None},
              "dbp": runs[0][first_dbp] | {"evals": None, "train": None},
              **runs[0]["comparison"]}  # fmt: skip
    for key in ("bp", "dbp"):
        result[key] = {k: v for k, v in result[key].items() if v is not None or k in ("mean_iou",)}
    write_comparison(args.output_dir, result)


if __name__ == "__main__":
    main()
