"""Tuning BP and DBP alike (`examples/sweep_bp_dbp.py`): variants of the MAE comparison's settings, each run per
seed on the same data, model and budget, and measured in optimizer steps against the best-tuned BP.

The caller passes the path of `examples/run_mae_dbp.py`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
import shutil
import statistics
import subprocess
import typing

from .analysis import first_reaching
from .arguments import ComparisonArguments, SweepArguments
from .mae import pretraining_command
from .records import json_default, read_run
from .report import sweep_markdown

BP_VARIANTS = (
    "bp:base_learning_rate=7.5e-4",
    "bp",
    "bp:base_learning_rate=3e-3",
    "bp:base_learning_rate=6e-3",
    "bp:weight_decay=0.15",
    "bp:base_learning_rate=3e-3,weight_decay=0",
    "bp:base_learning_rate=3e-3,weight_decay=0.15",
    "bp:base_learning_rate=6e-3,weight_decay=0.15",
)
DBP_VARIANTS = (
    "dbp",
    "dbp:decorrelation_lr=3e-4",
    "dbp:decorrelation_lr=3e-3",
    "dbp:decorrelation_lr_schedule=tied",
    "dbp:decorrelation_lr=3e-3,decorrelation_lr_schedule=tied",
    "dbp:decorrelation_kappa=1e-3",
    "dbp:decorrelation_kappa=0.1",
    "dbp:decorrelation_sample_fraction=0.03",
    "dbp:decorrelation_sample_fraction=0.3",
    "dbp:decorrelation_layers=qkv o_proj fc1 fc2",
    "dbp:decorrelation_layers=patch_embeddings qkv fc1",
    "dbp:base_learning_rate=3e-3",
    "dbp:weight_decay=0.15",
    # a second round around the best of the first (decorrelation lr 3e-3, tied)
    "dbp:decorrelation_lr=1e-2,decorrelation_lr_schedule=tied",
    "dbp:decorrelation_lr=3e-3,decorrelation_lr_schedule=tied,decorrelation_sample_fraction=0.03",
    "dbp:decorrelation_lr=3e-3,decorrelation_lr_schedule=tied,weight_decay=0.15",
)
PEER_VARIANTS = (
    "bp:base_learning_rate=1.5e-3",
    *(
        f"bp_{peer}:base_learning_rate={rate}"
        for peer, rates in {
            "muon": ("7.5e-4", "1.5e-3", "3e-3"),
            "soap": ("7.5e-4", "1.5e-3", "3e-3"),
            "schedulefree": ("1.5e-3", "3e-3", "6e-3"),
        }.items()
        for rate in rates
    ),
)
"""`--variants` of the peers' learning-rate sweep (docs/results.md, the peers' learning rates)."""


def parse_variant(text: str, base: ComparisonArguments) -> tuple[str, str, ComparisonArguments]:
    """`"dbp:decorrelation_lr=3e-3,weight_decay=0"` -> ("dbp", "adamw", the arguments with those values), checked."""
    method, _, overrides = text.partition(":")
    kind, _, optimizer = method.partition("_")
    if kind not in ("bp", "dbp"):
        raise ValueError(f"variant {text!r}: the method must be bp, dbp, bp_<optimizer> or dbp_<optimizer>")
    optimizer = optimizer or "adamw"
    fields = {f.name: f for f in dataclasses.fields(ComparisonArguments)}
    hints = typing.get_type_hints(ComparisonArguments)
    values = {}
    for item in filter(None, overrides.split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in fields or name in ("seeds", "output_dir", "optimizers", "learning_rate_sweep"):
            raise ValueError(f"variant {text!r}: {item!r} is not name=value of an argument a run can vary")
        hint = str(hints[name])
        if name == "decorrelation_update_every":  # a run updates R every k steps for one k
            values[name] = [int(value)]
        elif "list" in hint:
            values[name] = value.split()
        elif "float" in hint:
            values[name] = float(value)
        elif "int" in hint:
            values[name] = int(value)
        else:
            values[name] = value
    if "base_learning_rate" in values:  # the variant's rate is the run's, whatever the method
        values.setdefault("bp_base_learning_rate", None)
        values["optimizer_base_learning_rates"] = []
    if "weight_decay" in values:
        values.setdefault("bp_weight_decay", None)
    args = dataclasses.replace(base, optimizers=[optimizer], **values)
    return kind, optimizer, args


def learning_rate(kind: str, optimizer: str, args: ComparisonArguments) -> float:
    """The base learning rate of one run, as `compare_bp_dbp.py` would choose it."""
    peers = args.peer_rates()
    if optimizer in peers:
        return peers[optimizer]
    return (args.bp_base_learning_rate or args.base_learning_rate) if kind == "bp" else args.base_learning_rate


RUN_COMMAND = "sweep_command.json"
"""In each finished run's folder: the command (script and arguments) that made it, for `--reuse_runs`."""


def run_key(command: list[str]) -> tuple[str, ...]:
    """What makes two runs of `examples/run_mae_dbp.py` the same run: their arguments, without the script's path and
    the output folder (steps are deterministic for a seed: the same arguments would only come out the same again)."""
    arguments = list(command[1:])  # command[0] is the script
    if "--output_dir" in arguments:
        at = arguments.index("--output_dir")
        del arguments[at : at + 2]
    return tuple(arguments)


def finished_runs(output_dir: str) -> dict[tuple[str, ...], str]:
    """The finished runs in a sweep's folder, by `run_key`: a sweep rerun with `--reuse_runs` finds a run it has
    already made wherever the run sits (another variant's number, when the variants were reordered or shrunk; a
    folder copied in from another sweep)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "variant*", "seed*", RUN_COMMAND))):
        folder = os.path.dirname(path)
        if os.path.isfile(os.path.join(folder, "all_results.json")):
            with open(path) as file:
                runs.setdefault(run_key(json.load(file)), folder)
    return runs


def keep_aside(output: str, command: list[str], output_dir: str) -> str | None:
    """Where a run is about to go, a finished run of another command (the variants were reordered or changed since):
    moved to a `variant-kept<k>` folder of the sweep, where `--reuse_runs` still finds it, rather than overwritten.
    Returns its new folder, or None where there was nothing to keep."""
    path = os.path.join(output, RUN_COMMAND)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        if run_key(json.load(file)) == run_key(command):
            return None  # the same run made again (no --reuse_runs): replaced, as asked
    kept = next(
        folder
        for k in itertools.count()
        if not os.path.exists(folder := os.path.join(output_dir, f"variant-kept{k:02d}", os.path.basename(output)))
    )
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    shutil.move(output, kept)
    print(f"   kept the finished run of another command that was in {output}: now in {kept}", flush=True)
    return kept


def run_sweep(args: SweepArguments, pretraining_script: str) -> dict:
    """Run every variant for every seed (each checked before any run), tune the BP baseline (the BP variant of the
    lowest mean best eval loss), measure every variant against it, and write `sweep.json` and `sweep.md` to
    `args.output_dir`.

    Args:
        args (`SweepArguments`):
            The sweep's settings: its variants, and the comparison's arguments they start from.
        pretraining_script (`str`):
            The path of `examples/run_mae_dbp.py`, which every run is.

    Returns:
        `dict`: the summary `sweep.json` holds (without its `runs`).
    """
    base = ComparisonArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ComparisonArguments)})
    texts = args.variants or ([*BP_VARIANTS, *DBP_VARIANTS] if args.variant_set == "bp_dbp" else list(PEER_VARIANTS))
    variants = {text: parse_variant(text, base) for text in texts}  # every variant checked before any run
    if not any(kind == "bp" for kind, _, _ in variants.values()):
        raise ValueError("the sweep needs at least one BP variant: the baseline is the best of them")
    os.makedirs(args.output_dir, exist_ok=True)
    finished = finished_runs(args.output_dir) if args.reuse_runs else {}
    results = {}
    for number, (text, (kind, optimizer, run_args)) in enumerate(variants.items()):
        bp, lr = kind == "bp", learning_rate(kind, optimizer, run_args)
        results[text] = {"method": kind if optimizer == "adamw" else f"{kind}_{optimizer}", "runs": {}, "commands": {}}
        for seed in args.seeds:
            output = os.path.join(args.output_dir, f"variant{number:02d}", f"seed{seed}")
            print(f"== {text} (seed {seed}) -> {output}", flush=True)
            update_every = 1 if bp else max(run_args.decorrelation_update_every)
            command = pretraining_command(pretraining_script, run_args, seed, bp, output, lr, optimizer, update_every)
            results[text]["commands"][seed] = command[1:]  # the script and its arguments, to rerun one
            key = run_key(command[1:])
            if key in finished:
                output = finished[key]
                print(f"   reusing the finished run in {output}: the same command", flush=True)
            else:
                kept = keep_aside(output, command[1:], args.output_dir)
                if kept:  # the index follows the run it moved
                    finished = {k: kept if folder == output else folder for k, folder in finished.items()}
                subprocess.run(command, check=True)
                with open(os.path.join(output, RUN_COMMAND), "w") as file:  # written once the run has finished
                    json.dump(command[1:], file)
                if args.reuse_runs:  # another variant of the same arguments later in this sweep reads this run
                    finished[key] = output
            results[text]["runs"][seed] = read_run(output)
    mean_best = {text: statistics.mean(r["runs"][s].best_eval_loss for s in args.seeds) for text, r in results.items()}
    baseline = min((t for t in results if variants[t][0] == "bp"), key=mean_best.get)
    for text, result in results.items():
        per_seed = {}
        # the optimizer steps each run took (a budget in epochs or minutes has no --max_steps to read)
        steps = result["runs"][args.seeds[0]].optimizer_steps
        baseline_steps = results[baseline]["runs"][args.seeds[0]].optimizer_steps
        for seed in args.seeds:
            run, target = result["runs"][seed], results[baseline]["runs"][seed]
            reached = first_reaching(run.evals, target.best_eval_loss)
            per_seed[seed] = {
                "best_eval_loss": run.best_eval_loss,
                "step_of_best": run.step_of_best,
                "steps_to_baseline_best": reached.step if reached else None,
                "steps_saved_fraction": 1 - reached.step / target.step_of_best if reached else None,
                # the end of each schedule: a variant given fewer steps (its own warm-up and cosine) against the
                # baseline's final eval loss
                "final_eval_loss": run.final_eval_loss,
                "final_over_baseline_final": run.final_eval_loss - target.final_eval_loss,
            }
        saved = [p["steps_saved_fraction"] for p in per_seed.values()]
        result |= {
            "optimizer_steps": steps,
            "share_of_baseline_steps": steps / baseline_steps if steps and baseline_steps else None,
            "mean_best_eval_loss": mean_best[text],
            "per_seed": per_seed,
            "min_steps_saved_fraction": None if None in saved else min(saved),
        }
    summary = {
        "baseline": baseline,
        "seeds": args.seeds,
        "settings": vars(base),
        "variants": {t: {k: v for k, v in r.items() if k != "runs"} for t, r in results.items()},
    }
    with open(os.path.join(args.output_dir, "sweep.json"), "w") as file:
        json.dump(summary | {"runs": {t: r["runs"] for t, r in results.items()}}, file, indent=1, default=json_default)
    markdown = sweep_markdown(summary)
    with open(os.path.join(args.output_dir, "sweep.md"), "w") as file:
        file.write(markdown + "\n")
    print(markdown)
    print(f"Written: {args.output_dir}/sweep.json, sweep.md")
    return summary
