#!/usr/bin/env python
"""BP against DBP for causal language modelling: the same data, seed, initial weights and schedule, one after the
other.

Each run is `examples/run_clm_dbp.py` itself (DBP, and the same with `--bp_baseline`). The figures and their rules are
those of `examples/compare_bp_dbp.py`: steps (deterministic for a seed) and training seconds (each run timed with the
machine's other CPU use measured; a busy run is marked), per seed with the minimum over seeds, the speed-up curve at
25/50/75/100% of BP's budget, and a learning-rate sweep in which BP and DBP are each compared at their own best rate.

    python examples/compare_bp_dbp_clm.py                                   # the embedded Shakespeare default
    python examples/compare_bp_dbp_clm.py --demo_text heldout_python_docs   # a held-out set, no setting tuned on it
    python examples/compare_bp_dbp_clm.py --train_file my.txt --validation_file val.txt
    python examples/compare_bp_dbp_clm.py --optimizers adamw muon            # also BP-Muon against DBP-Muon

Writes comparison.json, comparison.md and comparison.png into --output_dir. Every flag and its default:
`hf_dbp.comparison.arguments.ClmComparisonArguments`; the harness: `hf_dbp.comparison` (`hf_dbp.comparison.clm`).
"""

import os

from hf_dbp.comparison.arguments import ClmComparisonArguments
from hf_dbp.comparison.clm import run_comparison
from hf_dbp.tasks.scripts import parse_script_arguments

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    (args,) = parse_script_arguments([ClmComparisonArguments], {})
    run_comparison(args, os.path.join(HERE, "run_clm_dbp.py"))


if __name__ == "__main__":
    main()
