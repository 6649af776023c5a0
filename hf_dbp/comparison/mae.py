"""BP-MAE against DBP-MAE (`examples/compare_bp_dbp.py`): the command line of each run of the pre-training script,
UperNet fine-tuning of both, and the comparison of every seed, method and learning rate.

The package does not know where the example scripts are: the caller passes the path of `run_mae_dbp.py` (and of
`run_segmentation.py`, for `--finetune_data_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from .analysis import choose_learning_rates, compare, speedup_curve, summarize_pairs, worse_than_bp
from .arguments import ComparisonArguments
from .methods import method_names, optimizer_pairs, update_every_of
from .records import MaeRunRecord
from .report import write_comparison
from .runs import decorrelation_flags, train_every_run

logger = logging.getLogger(__name__)


def pretraining_command(
    script: str,
    args: ComparisonArguments,
    seed: int,
    bp: bool,
    output_dir: str,
    base_lr: float,
    optimizer: str = "adamw",
    update_every: int = 1,
) -> list[str]:
    """The command line of one run of the pre-training script `script` (`examples/run_mae_dbp.py`): BP (`bp`) or DBP
    with `optimizer` at the base learning rate `base_lr`, R updated every `update_every` optimizer steps."""
    weight_decay = args.bp_weight_decay if bp and args.bp_weight_decay is not None else args.weight_decay
    command = [sys.executable, script, "--output_dir", output_dir, "--seed", str(seed)]
    command += [
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(args.eval_steps),
        "--logging_steps",
        str(args.eval_steps),
    ]
    command += ["--save_strategy", "no", "--report_to", "none", "--norm_pix_loss", "true"]
    command += ["--per_device_train_batch_size", str(args.per_device_train_batch_size)]
    command += ["--per_device_eval_batch_size", "128"]
    command += ["--num_train_epochs", str(args.num_train_epochs), "--max_steps", str(args.max_steps)]
    command += ["--base_learning_rate", str(base_lr), "--weight_decay", str(weight_decay)]
    command += ["--adam_beta2", "0.95", "--warmup_steps", str(args.warmup_steps), "--dataloader_num_workers", "0"]
    command += ["--disable_tqdm", "true", *decorrelation_flags(args)]
    command += ["--decorrelation_variance_form", args.decorrelation_variance_form]
    command += ["--decorrelation_layers", *args.decorrelation_layers]
    command += ["--muon_lr_multiplier", str(args.muon_lr_multiplier)]
    if optimizer == "schedulefree":  # warm-up inside the optimizer, and no schedule: that is the point of it
        command += ["--optim", "schedule_free_adamw", "--lr_scheduler_type", "constant", "--matrix_optimizer", "adamw"]
    else:
        command += ["--lr_scheduler_type", "cosine", "--matrix_optimizer", optimizer]
    for flag in (
        "train_dir",
        "validation_dir",
        "dataset_name",
        "image_column_name",
        "max_train_samples",
        "max_eval_samples",
        "model_name_or_path",
        "max_train_minutes",
        "emissions_country",
    ):
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


def finetune(script: str, args: ComparisonArguments, checkpoint: str, output_dir: str) -> float | None:
    """UperNet's mIoU after fine-tuning `checkpoint` with the segmentation script `script`
    (`examples/run_segmentation.py`) on `--finetune_data_dir` or `--finetune_dataset_name`; None without either."""
    if args.finetune_data_dir is None and args.finetune_dataset_name is None:
        return None
    command = [sys.executable, script, "--model_name_or_path", checkpoint, "--output_dir", output_dir]
    command += ["--report_to", "none", "--save_strategy", "no"]
    if args.finetune_data_dir:
        command += ["--data_dir", args.finetune_data_dir]
    else:
        command += ["--dataset_name", args.finetune_dataset_name]
    command += args.finetune_args.split()
    subprocess.run(command, check=True)
    with open(os.path.join(output_dir, "all_results.json")) as file:
        return json.load(file)["eval_mean_iou"]


def run_comparison(args: ComparisonArguments, pretraining_script: str, finetune_script: str) -> dict:
    """Train BP and DBP (with every optimizer of `--optimizers`, and DBP updating R every k steps for each k of
    `--decorrelation_update_every`) for every seed, compare them, and write `comparison.json`, `comparison.md` and
    `comparison.png` to `args.output_dir`.

    Args:
        args (`ComparisonArguments`):
            The comparison's settings.
        pretraining_script (`str`):
            The path of `examples/run_mae_dbp.py`, which every run is.
        finetune_script (`str`):
            The path of `examples/run_segmentation.py`, run for `--finetune_data_dir` / `--finetune_dataset_name`.

    Returns:
        `dict`: what `comparison.json` holds, with each run as a `MaeRunRecord`.
    """
    os.makedirs(args.output_dir, exist_ok=True)
    pairs, optimizer_of = optimizer_pairs(args.optimizers)  # (bp_x, dbp_x) per optimizer
    for k in dict.fromkeys(args.decorrelation_update_every):
        if k > 1:  # DBP with AdamW, R updated every k steps, against bp
            pairs.append(("bp", f"dbp_every{k}"))
            optimizer_of[f"dbp_every{k}"] = "adamw"
    methods = list(dict.fromkeys(method for pair in pairs for method in pair))
    rates = {
        m: (args.bp_base_learning_rate or args.base_learning_rate) if m.startswith("bp") else args.base_learning_rate
        for m in methods
    }
    for name, rate in args.peer_rates().items():  # a peer tuned on its own: both its BP and its DBP at its rate
        for method in method_names(name):
            if method in rates:
                rates[method] = rate
    sweep = args.learning_rate_sweep or []

    def command(seed, method, output, base_lr):
        bp, update_every = method.startswith("bp"), update_every_of(method)
        return pretraining_command(
            pretraining_script, args, seed, bp, output, base_lr, optimizer_of[method], update_every
        )

    trained = train_every_run(args.output_dir, args.seeds, methods, rates, sweep, command)
    sweep_result = None
    if sweep:  # each method at its own best rate: the baselines are tuned exactly as carefully as DBP
        sweep_result = choose_learning_rates(
            methods, args.seeds, sweep, lambda s, m, lr: trained[s, m, lr][1].best_eval_loss
        )
        rates.update(sweep_result["chosen"])
    runs = []
    for seed in args.seeds:
        run = {"seed": seed}
        for method in methods:
            output, record = trained[seed, method, rates[method]]
            mean_iou = finetune(finetune_script, args, output, output + "-upernet")
            run[method] = MaeRunRecord(
                **vars(record), base_learning_rate=rates[method], optimizer=optimizer_of[method], mean_iou=mean_iou
            )
        # Each DBP against the BP with its own optimizer; every method's speed-up curve against the first BP.
        run["comparisons"] = {dbp: compare(run[bp], run[dbp]) for bp, dbp in pairs}
        run["speedup_curve"] = {m: speedup_curve(run[pairs[0][0]], run[m]) for m in methods if m != pairs[0][0]}
        run["comparison"] = run["comparisons"][pairs[0][1]]
        runs.append(run)
    summary = summarize_pairs(runs, pairs, methods)
    summary["worse_than_bp"] = {dbp: worse_than_bp(runs, bp, dbp) for bp, dbp in pairs}
    for dbp, lines in summary["worse_than_bp"].items():
        if lines:  # what the user came to find out, before spending a whole training on DBP
            logger.warning(
                "On this data %s left a worse model than BP in %s. Keep the best checkpoint when you train with it "
                "(--load_best_model_at_end true with evaluation), or train with BP; see docs/results.md, 'Data "
                "nobody tuned on'.",
                dbp,
                "; ".join(lines),
            )
    first_bp, first_dbp = pairs[0]
    result = {
        "settings": {k: v for k, v in vars(args).items()},
        "methods": methods,
        "runs": runs,
        "summary": summary,
        "sweep": sweep_result,
        # the first seed's figures also at the top level, where a reader of a one-seed comparison looks first
        "bp": runs[0][first_bp].to_dict() | {"evals": None, "train": None},
        "dbp": runs[0][first_dbp].to_dict() | {"evals": None, "train": None},
        **runs[0]["comparison"],
    }
    for key in ("bp", "dbp"):
        result[key] = {k: v for k, v in result[key].items() if v is not None or k in ("mean_iou",)}
    write_comparison(args.output_dir, result)
    return result
