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
one mask for all evaluations (see `hf_dbp.tasks.image_data.fixed_mask_noise`), so the curves move with the weights
only. Each run records the CPU that other processes took while it ran, and is marked busy above 5% (its seconds are
then no figure; its steps still are).

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

Every flag and its default: `hf_dbp.comparison.arguments.ComparisonArguments`; the harness (run records, the
machine's load, the arithmetic, the report): `hf_dbp.comparison`.
"""

import os

from hf_dbp.comparison.arguments import ComparisonArguments
from hf_dbp.comparison.mae import run_comparison
from hf_dbp.tasks.scripts import parse_script_arguments

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    (args,) = parse_script_arguments([ComparisonArguments], {})
    run_comparison(args, os.path.join(HERE, "run_mae_dbp.py"), os.path.join(HERE, "run_segmentation.py"))


if __name__ == "__main__":
    main()
