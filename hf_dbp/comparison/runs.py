"""Training every run of a comparison, one after the other so that their timings do not overlap, each timed alone
(`hf_dbp.comparison.machine.run_alone`) and read back as a `RunRecord`."""

from __future__ import annotations

import os
from collections.abc import Callable

from .arguments import ClmComparisonArguments, ComparisonArguments
from .machine import run_alone
from .records import RunRecord, read_run


def decorrelation_flags(args: ComparisonArguments | ClmComparisonArguments) -> list[str]:
    """The DBP settings every comparison gives its training script, whose flags of these names are the same in
    `run_mae_dbp.py` and `run_clm_dbp.py` (a BP run measures its decorrelation loss with them). R's form is passed
    only where it is not the paper's, so that the commands of earlier runs stay those a sweep's `--reuse_runs` finds."""
    form = [] if args.decorrelation_preset == "paper" else ["--decorrelation_preset", args.decorrelation_preset]
    if args.decorrelation_block_size is not None:
        form += ["--decorrelation_block_size", str(args.decorrelation_block_size)]
    return form + [
        "--decorrelation_lr",
        str(args.decorrelation_lr),
        "--decorrelation_kappa",
        str(args.decorrelation_kappa),
        "--decorrelation_sample_fraction",
        str(args.decorrelation_sample_fraction),
        "--decorrelation_lr_schedule",
        args.decorrelation_lr_schedule,
    ]


def train_every_run(
    output_dir: str,
    seeds: list[int],
    methods: list[str],
    rates: dict[str, float],
    sweep: list[float],
    command: Callable[[int, str, str, float], list[str]],
) -> dict[tuple[int, str, float], tuple[str, RunRecord]]:
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
                if machine.busy:
                    print(
                        f"WARNING: other processes used {machine.other_cpu_fraction:.0%} of the CPU during this "
                        "run: its seconds are not a figure (its steps are).",
                        flush=True,
                    )
                record = read_run(output)
                record.machine = machine
                trained[seed, method, rate] = (output, record)
    return trained
