"""BP against DBP for causal language modelling (`examples/compare_bp_dbp_clm.py`): the command line of each run of
the training script, and the comparison of every seed and learning rate, by the MAE comparison's rules.

The caller passes the path of `examples/run_clm_dbp.py`.
"""

from __future__ import annotations

import os
import sys

from ..training.optimizers import MATRIX_OPTIMIZERS
from .analysis import choose_learning_rates, compare, speedup_curve, summarize_pairs
from .arguments import ClmComparisonArguments
from .methods import method_names, optimizer_pairs
from .records import ClmRunRecord
from .report import write_comparison
from .runs import decorrelation_flags, train_every_run


def training_command(
    script: str,
    args: ClmComparisonArguments,
    seed: int,
    bp: bool,
    output_dir: str,
    lr: float,
    optimizer: str = "adamw",
) -> list[str]:
    """The command line of one run of the training script `script` (`examples/run_clm_dbp.py`): BP (`bp`) or DBP at
    the peak learning rate `lr`, with `optimizer` on the hidden matrices."""
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
    if optimizer != "adamw":
        command += ["--matrix_optimizer", optimizer, "--muon_lr_multiplier", str(args.muon_lr_multiplier)]
    return command + (["--bp_baseline"] if bp else [])


def learning_rates(args: ClmComparisonArguments, methods: list[str]) -> dict[str, float]:
    """The peak learning rate of each method: BP's and DBP's own, or what `--optimizer_learning_rates` gives a peer
    (`muon=...`: its BP and its DBP) or one method (`dbp_muon=...`)."""
    rates = {
        m: (args.bp_learning_rate or args.learning_rate) if m.startswith("bp") else args.learning_rate for m in methods
    }
    for name, rate in args.peer_rates().items():
        for method in method_names(name) if name in MATRIX_OPTIMIZERS else (name,):
            if method in rates:
                rates[method] = rate
    return rates


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
    pairs, optimizer_of = optimizer_pairs(args.optimizers)  # (bp_x, dbp_x) per optimizer
    methods = [method for pair in pairs for method in pair]
    rates = learning_rates(args, methods)
    sweep = args.learning_rate_sweep or []

    def command(seed, method, output, lr):
        return training_command(training_script, args, seed, method.startswith("bp"), output, lr, optimizer_of[method])

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
            record = trained[seed, m, rates[m]]
            run[m] = ClmRunRecord(**vars(record), learning_rate=rates[m], optimizer=optimizer_of[m])
        # Each DBP against the BP with its own optimizer; every method's speed-up curve against the first BP.
        run["comparisons"] = {dbp: compare(run[bp], run[dbp]) for bp, dbp in pairs}
        run["comparison"] = run["comparisons"][pairs[0][1]]
        run["speedup_curve"] = {m: speedup_curve(run[pairs[0][0]], run[m]) for m in methods if m != pairs[0][0]}
        runs.append(run)
    summary = summarize_pairs(runs, pairs, methods)
    result = {"settings": vars(args), "methods": methods, "runs": runs, "summary": summary, "sweep": sweep_result}
    write_comparison(args.output_dir, result)
    return result
