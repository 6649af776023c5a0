"""BP against DBP on the same data, seed, model, schedule and budget: the harness of `examples/compare_bp_dbp.py`,
`examples/compare_bp_dbp_clm.py` and `examples/sweep_bp_dbp.py`, one concern per module.

- `arguments`: every flag of the three scripts and its default (the one place to change a default).
- `records`: `RunRecord` (a finished run's evaluations, training records, best eval loss and the step, seconds and
  energy to it, the machine's load) and `read_run(output_dir)`.
- `machine`: `run_alone` (run a command and measure the CPU other processes took meanwhile; busy above
  `BUSY_FRACTION`).
- `runs`: `train_every_run`, every run of a comparison one after the other.
- `methods`: the records' names (bp, dbp, bp_<optimizer>, dbp_every<k>) and which BP each DBP is compared with.
- `analysis`: steps and seconds to BP's best (`compare`), `speedup_curve`, `predictors`, `summarize`, and each
  method's learning rate from a sweep.
- `report`: `comparison.json`, `comparison.md`, `comparison.png`, the sweep's table; `format_number`.
- `mae`, `clm`, `sweep`: the image comparison, the language-modelling comparison and the settings sweep, given the
  path of the example script each runs.
"""

from .analysis import choose_learning_rates, compare, first_reaching, predictors, speedup_curve, summarize
from .arguments import ClmComparisonArguments, ComparisonArguments, SweepArguments
from .machine import BUSY_FRACTION, run_alone
from .records import ClmRunRecord, Evaluation, MachineLoad, MaeRunRecord, RunRecord, TrainingLog, read_run
from .report import format_number, write_comparison
from .runs import train_every_run

__all__ = [
    "BUSY_FRACTION",
    "ClmComparisonArguments",
    "ClmRunRecord",
    "ComparisonArguments",
    "Evaluation",
    "MachineLoad",
    "MaeRunRecord",
    "RunRecord",
    "SweepArguments",
    "TrainingLog",
    "choose_learning_rates",
    "compare",
    "first_reaching",
    "format_number",
    "predictors",
    "read_run",
    "run_alone",
    "speedup_curve",
    "summarize",
    "train_every_run",
    "write_comparison",
]
