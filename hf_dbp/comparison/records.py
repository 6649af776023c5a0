"""What one training run leaves for the comparison: its evaluations and training records, its best eval loss and the
step, seconds and energy to it, and the machine's load while it ran.

`read_run(output_dir)` reads a finished run of an example script (its `trainer_state.json` and `all_results.json`);
`RunRecord.to_dict()` is the record as `comparison.json` and `sweep.json` write it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any


@dataclasses.dataclass
class Evaluation:
    """One evaluation of a run: its optimizer step, the training seconds before it, the eval loss, and the energy
    and emissions up to it (None where not tracked)."""

    step: int
    train_seconds: float
    eval_loss: float
    energy_kwh: float | None = None
    emissions_g: float | None = None


@dataclasses.dataclass
class TrainingLog:
    """One training record of a run (every `--logging_steps`): the training loss and the decorrelation loss."""

    step: int
    train_seconds: float
    loss: float
    decorrelation_loss: float | None = None


@dataclasses.dataclass
class MachineLoad:
    """The machine while a run had it (see `hf_dbp.comparison.machine.run_alone`): the run's wall-clock and CPU
    seconds, the CPU other processes took meanwhile, and whether that made it busy. The last three are None where
    the machine's CPU use cannot be read (no Linux /proc/stat)."""

    wall_seconds: float
    own_cpu_seconds: float
    other_cpu_seconds: float | None = None
    other_cpu_fraction: float | None = None
    busy: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """As `comparison.json` writes it (without `other_cpu_seconds` where it is unknown)."""
        out = dataclasses.asdict(self)
        if self.other_cpu_seconds is None:
            del out["other_cpu_seconds"]
        return out


@dataclasses.dataclass
class RunRecord:
    """One finished run: every evaluation and training record, the best eval loss with the step, training seconds,
    energy and emissions to it, the whole run's energy, emissions and training seconds, its final eval loss (the
    evaluation after its last step) and optimizer steps, and (for a run the comparison timed) the machine's load."""

    evals: list[Evaluation]
    train: list[TrainingLog]
    best_eval_loss: float
    seconds_to_best: float
    step_of_best: int
    energy_kwh_to_best: float | None = None
    emissions_g_to_best: float | None = None
    energy_kwh: float | None = None
    emissions_g: float | None = None
    train_seconds: float | None = None
    final_eval_loss: float | None = None
    optimizer_steps: int | None = None
    machine: MachineLoad | None = None

    @classmethod
    def from_log_history(
        cls, history: list[dict], results: dict | None = None, optimizer_steps: int | None = None
    ) -> RunRecord:
        """The record of a run from its Trainer log history (the records carrying `train_seconds`), its final
        results (`all_results.json`) and the optimizer steps it took (`trainer_state.json`'s `global_step`)."""
        results = results or {}
        evals = [r for r in history if "eval_loss" in r and "train_seconds" in r]
        train = [r for r in history if "loss" in r and "train_seconds" in r]
        best = min(evals, key=lambda r: r["eval_loss"])
        return cls(
            evals=[Evaluation(**{f.name: r.get(f.name) for f in dataclasses.fields(Evaluation)}) for r in evals],
            train=[TrainingLog(**{f.name: r.get(f.name) for f in dataclasses.fields(TrainingLog)}) for r in train],
            best_eval_loss=best["eval_loss"],
            seconds_to_best=best["train_seconds"],
            step_of_best=best["step"],
            energy_kwh_to_best=best.get("energy_kwh"),
            emissions_g_to_best=best.get("emissions_g"),
            energy_kwh=results.get("train_energy_kwh"),
            emissions_g=results.get("train_emissions_g"),
            train_seconds=train[-1]["train_seconds"] if train else None,
            # The scripts evaluate the final model once more after training (`all_results.json`), whatever the
            # evaluation interval; a run without it ends at its last evaluation.
            final_eval_loss=results.get("eval_loss", evals[-1]["eval_loss"]),
            optimizer_steps=optimizer_steps,
        )

    def to_dict(self) -> dict[str, Any]:
        """As `comparison.json` and `sweep.json` write it: every field in order, `machine` only where there is one."""
        out = dataclasses.asdict(self)
        if self.machine is None:
            del out["machine"]
        else:
            out["machine"] = self.machine.to_dict()
        return out


@dataclasses.dataclass(kw_only=True)
class MaeRunRecord(RunRecord):
    """A run of the MAE comparison (`examples/compare_bp_dbp.py`): also its base learning rate, its optimizer and,
    where both were fine-tuned with UperNet, the mIoU."""

    base_learning_rate: float
    optimizer: str
    mean_iou: float | None = None


@dataclasses.dataclass(kw_only=True)
class ClmRunRecord(RunRecord):
    """A run of the causal language modelling comparison (`examples/compare_bp_dbp_clm.py`): also its learning rate
    and its optimizer."""

    learning_rate: float
    optimizer: str = "adamw"


def read_run(output_dir: str) -> RunRecord:
    """The record of the finished run in `output_dir` (its `trainer_state.json` and `all_results.json`)."""
    with open(os.path.join(output_dir, "trainer_state.json")) as file:
        state = json.load(file)
    with open(os.path.join(output_dir, "all_results.json")) as file:
        results = json.load(file)
    return RunRecord.from_log_history(state["log_history"], results, state.get("global_step"))


def json_default(value: Any) -> Any:
    """`json.dump`'s `default`: records as their `to_dict()`, a NaN as null."""
    if isinstance(value, (RunRecord, MachineLoad)):
        return value.to_dict()
    return None if isinstance(value, float) and math.isnan(value) else value
