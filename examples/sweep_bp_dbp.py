#!/usr/bin/env python
"""Tune BP and DBP alike: a sweep of their settings on one data set, each variant against the best-tuned BP.

    python examples/sweep_bp_dbp.py                                   # the sweep of docs/results.md (default set)
    python examples/sweep_bp_dbp.py --variant_set peers --output_dir outputs/sweep-peers   # the peers' learning rates
    python examples/sweep_bp_dbp.py --seeds 0 1 2 --variants "bp:base_learning_rate=3e-3,weight_decay=0.15" \\
        "dbp:decorrelation_kappa=0.1" "dbp_muon:decorrelation_lr=3e-3"

A variant is a method (`bp`, `dbp`, `bp_<optimizer>`, `dbp_<optimizer>`) and overrides of `compare_bp_dbp.py`'s
arguments (`name=value`, comma-separated; lists space-separated, e.g. `decorrelation_layers=qkv fc1`). Every variant
is one `examples/run_mae_dbp.py` run per seed, one after the other, on the same data, model and budget as
`compare_bp_dbp.py`, which also takes every other argument of that script (`--demo_photos`, `--train_dir`, ...).

The BP variant with the lowest mean best eval loss over the seeds is the tuned baseline; for every variant the sweep
reports its best eval loss (mean and per seed), the step of its best and, per seed, the optimizer steps it needs to
reach the tuned baseline's best eval loss of that seed and the fraction saved (deterministic for a seed, so this
sweep may run on a busy machine: its seconds are recorded but not compared). Writes `sweep.json` and `sweep.md`.
Every flag and its default: `hf_dbp.comparison.arguments.SweepArguments`; the variants and the sweep itself:
`hf_dbp.comparison.sweep`.
"""

import os

from hf_dbp.comparison.arguments import SweepArguments
from hf_dbp.comparison.sweep import run_sweep
from hf_dbp.tasks.scripts import parse_script_arguments

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    (args,) = parse_script_arguments([SweepArguments], {})
    run_sweep(args, os.path.join(HERE, "run_mae_dbp.py"))


if __name__ == "__main__":
    main()
