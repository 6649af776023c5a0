#!/usr/bin/env python
"""BP against DBP for causal language modelling: the same data, seed, initial weights and schedule, one after the other.

Each run is `examples/run_clm_dbp.py` itself (DBP, and the same with `--bp_baseline`). The figures and their rules are
those of `examples/compare_bp_dbp.py`: steps (deterministic for a seed) and training seconds (each run timed with the
machine's other CPU use measured; a busy run is marked), per seed with the minimum over seeds, the speed-up curve at
25/50/75/100% of BP's budget, and a learning-rate sweep in which BP and DBP are each compared at their own best rate.

    python examples/compare_bp_dbp_clm.py                                   # the embedded Shakespeare default
    python examples/compare_bp_dbp_clm.py --demo_text heldout_python_docs   # a held-out set, no setting tuned on it
    python examples/compare_bp_dbp_clm.py --train_file my.txt --validation_file val.txt

Writes comparison.json, comparison.md and comparison.png into --output_dir.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from compare_bp_dbp import (
    choose_learning_rates,
    compare,
    parse_arguments,
    predictors,
    speedup_curve,
    summarize,
    train_every_run,
    write_comparison,
)
from run_clm_dbp import DEMO_MODEL

from hf_dbp.tasks.text_data import TEXT_SETS
from hf_dbp.training.training_args import DECORRELATION_LR_SCHEDULES

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ClmComparisonArguments:
    output_dir: str = field(default="outputs/compare-bp-dbp-clm", metadata={"help": "Where the runs and the comparison go."})
    demo_text: str = field(default="default", metadata={"help": "Without files of yours: the embedded text set ('default', tuned on; 'heldout_plays', 'heldout_python_docs': held out).", "choices": list(TEXT_SETS)})
    train_file: str | None = field(default=None, metadata={"help": "A text file of yours instead."})
    validation_file: str | None = field(default=None, metadata={"help": "Its validation file."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One BP and one DBP run per seed."})
    model_type: str = field(default="llama", metadata={"help": "The architecture trained from scratch."})
    config_overrides: str = field(default=DEMO_MODEL, metadata={"help": "Its size."})
    block_size: int = field(default=128)
    tokenizer_vocab_size: int = field(default=2048)
    max_steps: int = field(default=200, metadata={"help": "The budget in optimizer steps."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate every this many steps."})
    max_eval_samples: int = field(default=64, metadata={"help": "Validation blocks (the same for every run)."})
    per_device_train_batch_size: int = field(default=16)
    learning_rate: float = field(default=8e-3, metadata={"help": "The weights' peak learning rate, for DBP (8e-3: its best of 1e-3, 2e-3, 4e-3, 8e-3 on the default text, seed 0)..."})
    bp_learning_rate: float | None = field(default=4e-3, metadata={"help": "...and for BP, tuned alike (4e-3: its best of the same four; empty: the same as DBP)."})
    learning_rate_sweep: list[float] | None = field(default=None, metadata={"help": "Learning rates to try for both (replaces the two above): each method is compared at its own best, the lowest mean best eval loss over the seeds."})
    warmup_steps: int = field(default=30)
    weight_decay: float = field(default=0.1)
    decorrelation_lr: float = field(default=1e-3, metadata={"help": "R's learning rate."})
    decorrelation_kappa: float = field(default=1e-2)
    decorrelation_sample_fraction: float = field(default=0.1)
    decorrelation_lr_schedule: str = field(default="tied", metadata={"help": "'constant', or 'tied' to the weights' warm-up and decay.", "choices": list(DECORRELATION_LR_SCHEDULES)})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Layers to decorrelate (default: the architecture's)."})


def training_command(args: ClmComparisonArguments, seed: int, bp: bool, output_dir: str, lr: float) -> list[str]:
    command = [sys.executable, os.path.join(HERE, "run_clm_dbp.py"), "--output_dir", output_dir, "--seed", str(seed),
               "--model_type", args.model_type, "--config_overrides", args.config_overrides,
               "--block_size", str(args.block_size), "--tokenizer_vocab_size", str(args.tokenizer_vocab_size),
               "--max_steps", str(args.max_steps), "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps),
               "--logging_steps", str(args.eval_steps), "--max_eval_samples", str(args.max_eval_samples),
               "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--per_device_eval_batch_size", "64",
               "--learning_rate", str(lr), "--warmup_steps", str(args.warmup_steps), "--lr_scheduler_type", "cosine",
               "--weight_decay", str(args.weight_decay), "--adam_beta2", "0.95", "--save_strategy", "no",
               "--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
               "--decorrelation_lr", str(args.decorrelation_lr), "--decorrelation_kappa", str(args.decorrelation_kappa),
               "--decorrelation_sample_fraction", str(args.decorrelation_sample_fraction),
               "--decorrelation_lr_schedule", args.decorrelation_lr_schedule]  # fmt: skip
    if args.train_file is not None:
        command += ["--train_file", args.train_file] + (["--validation_file", args.validation_file] if args.validation_file else [])
    else:
        command += ["--demo_text", args.demo_text]
    if args.target_modules:
        command += ["--target_modules", *args.target_modules]
    return command + (["--bp_baseline"] if bp else [])


def main() -> None:
    args = parse_arguments(ClmComparisonArguments)
    os.makedirs(args.output_dir, exist_ok=True)
    methods = ["bp", "dbp"]
    rates = {"bp": args.bp_learning_rate or args.learning_rate, "dbp": args.learning_rate}
    sweep = args.learning_rate_sweep or []
    trained = train_every_run(args.output_dir, args.seeds, methods, rates, sweep,
                              lambda seed, method, output, lr: training_command(args, seed, method == "bp", output, lr))
    trained = {key: record for key, (_, record) in trained.items()}
    sweep_result = None
    if sweep:  # each method at its own best rate: BP is tuned exactly as carefully as DBP
        sweep_result = choose_learning_rates(methods, args.seeds, sweep, lambda s, m, lr: trained[s, m, lr]["best_eval_loss"])
        rates.update(sweep_result["chosen"])
    runs = []
    for seed in args.seeds:
        run = {"seed": seed, **{m: trained[seed, m, rates[m]] | {"learning_rate": rates[m]} for m in methods}}
        run["comparisons"] = {"dbp": compare(run["bp"], run["dbp"])}
        run["comparison"] = run["comparisons"]["dbp"]
        run["speedup_curve"] = {"dbp": speedup_curve(run["bp"], run["dbp"])}
        runs.append(run)
    keys = ("steps_saved_fraction", "time_saved_fraction", "emissions_saved_fraction")
    summary = {key: summarize([r["comparison"][key] for r in runs]) for key in keys}
    summary["comparisons"] = {"dbp": {key: summary[key] for key in keys}}
    summary["busy_runs"] = sum(bool(r[m]["machine"]["busy"]) for r in runs for m in methods)
    summary["predictors"] = predictors(runs, "bp")
    result = {"settings": vars(args), "methods": methods, "runs": runs, "summary": summary, "sweep": sweep_result}
    write_comparison(args.output_dir, result)


if __name__ == "__main__":
    main()
