"""BP against DBP for causal language modelling (`examples/compare_bp_dbp_clm.py`): the command line of each run of
the training script, and the comparison of every seed and learning rate, by the MAE comparison's rules.

The caller passes the path of `examples/run_clm_dbp.py`.
"""

from __future__ import annotations

import os
import sys

from .analysis import choose_learning_rates, compare, predictors, speedup_curve, summarize
from .arguments import ClmComparisonArguments
from .records import ClmRunRecord
from .report import write_comparison
from .runs import decorrelation_flags, train_every_run


def training_command(
    script: str, args: ClmComparisonArguments, seed: int, bp: bool, output_dir: str, lr: float
) -> list[str]:
    """The command line of one run of the training script `script` (`examples/run_clm_dbp.py`): BP (`bp`) or DBP at
    the peak learning rate `lr`."""
    command = [sys.executable, script, "--output_dir", output_dir, "--seed", str(seed)]
    command += ["--model_type", args.model_type, "--config_overrides", args.config_overrides]
    command += ["--block_size", str(args.block_size), "--tokenizer_vocab_size", str(args.tokenizer_vocab_size)]
    command += ["--max_steps", str(args.max_steps), "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps)]
    command += ["--logging_steps", str(args.eval_steps), "--max_eval_samples", str(args.max_eval_samples)]
    command += ["--per_device_train_batch_size", str(args.per_device_train_batch_size)]
    command += ["--per_device_eval_batch_size", "64"]
    command += ["--learning_rate", str(lr), "--warmup_steps", str(args.warmup_steps), "--lr_scheduler_type", "cosine"]
    command += ["--weight_decay", str(args.weight_decay), "--adam_beta2", "0.95", "--save_strategy", "no"]
    command += ["--report_to", "none", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    command += decorrelation_flags(args)
    if args.train_file is not None:
        command += ["--train_file", args.train_file]
        command += ["--validation_file", args.validation_file] if args.validation_file else []
    else:
        command += ["--demo_text", args.demo_text]
    if args.target_modules:
        command += ["--target_modules", *args.target_modules]
    return command + (["--bp_baseline"] if bp else [])


def run_comparison(args: ClmComparisonArguments, training_script: str) -> dict:
    """Train BP and DBP for every seed (and every rate of `--learning_rate_sweep`), compare them, and write
    `comparison.json`, `comparison.md` and `comparison.png` to `args.output_dir`.

    Args:
        args (`ClmComparisonArguments`):
            The comparison's settings.
        training_script (`str`):
            The path of `examples/run_clm_dbp.py`, which every run is.

    Returns:
        `dict`: what `comparison.json` holds, with each run as a `ClmRunRecord`.
    """
    os.makedirs(args.output_dir, exist_ok=True)
    methods = ["bp", "dbp"]
    rates = {"bp": args.bp_learning_rate or args.learning_rate, "dbp": args.learning_rate}
    sweep = args.learning_rate_sweep or []

    def command(seed, method, output, lr):
        return training_command(training_script, args, seed, method == "bp", output, lr)

    trained = train_every_run(args.output_dir, args.seeds, methods, rates, sweep, command)
    trained = {key: record for key, (_, record) in trained.items()}
    sweep_result = None
    if sweep:  # each method at its own best rate: BP is tuned exactly as carefully as DBP
        sweep_result = choose_learning_rates(
            methods, args.seeds, sweep, lambda s, m, lr: trained[s, m, lr].best_eval_loss
        )
        rates.update(sweep_result["chosen"])
    runs = []
    for seed in args.seeds:
        run = {"seed": seed}
        for m in methods:
            run[m] = ClmRunRecord(**vars(trained[seed, m, rates[m]]), learning_rate=rates[m])
        run["comparisons"] = {"dbp": compare(run["bp"], run["dbp"])}
        run["comparison"] = run["comparisons"]["dbp"]
        run["speedup_curve"] = {"dbp": speedup_curve(run["bp"], run["dbp"])}
        runs.append(run)
    keys = ("steps_saved_fraction", "time_saved_fraction", "emissions_saved_fraction")
    summary = {key: summarize([r["comparison"][key] for r in runs]) for key in keys}
    summary["comparisons"] = {"dbp": {key: summary[key] for key in keys}}
    summary["busy_runs"] = sum(bool(r[m].machine.busy) for r in runs for m in methods)
    summary["predictors"] = predictors(runs, "bp")
    result = {"settings": vars(args), "methods": methods, "runs": runs, "summary": summary, "sweep": sweep_result}
    write_comparison(args.output_dir, result)
    return result
