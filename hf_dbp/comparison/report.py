"""What a comparison writes: `comparison.json`, `comparison.md` (its tables, printed too) and `comparison.png` (the
curves), and the table of a settings sweep (`sweep.md`); numbers formatted alike in all of them."""

from __future__ import annotations

import json
import os

from .analysis import CURVE_FRACTIONS, EARLY_STEPS
from .methods import baseline_of
from .records import json_default


def format_number(value, digits: int = 4) -> str:
    """`value` for a table: a float to `digits` significant digits, None as "n/a", anything else as `str`."""
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_markdown(path: str, result: dict) -> None:
    """The comparison's tables (per pair of BP and DBP, the speed-up curve, UperNet's mIoU, the early predictors and
    a learning-rate sweep, each where the result has it) as markdown in `path`."""
    fmt, runs, methods = format_number, result["runs"], result.get("methods", ["bp", "dbp"])
    lines = []
    for dbp, summary in result["summary"]["comparisons"].items():
        bp = baseline_of(dbp)
        lines += [
            f"**{dbp} against {bp}** (steps and training seconds to {bp}'s best eval loss; busy: other processes "
            "took CPU during a run, its seconds are then no figure)",
            "",
            f"| seed | {bp} best eval loss | {bp} step of best | {bp} s to best | {dbp} best eval loss | "
            f"{dbp} steps to it | {dbp} s to it | steps saved | time saved | emissions saved | {bp} g CO2 | "
            f"{dbp} g CO2 | busy |",
            "|" + " --- |" * 13,
        ]
        for run in runs:
            b, d, c = run[bp], run[dbp], run["comparisons"][dbp]
            busy = [m for m in (bp, dbp) if run[m].machine is not None and run[m].machine.busy]
            lines.append(
                f"| {run['seed']} | {fmt(b.best_eval_loss)} | {b.step_of_best} | "
                f"{fmt(b.seconds_to_best, 3)} | {fmt(d.best_eval_loss)} | {fmt(c['dbp_steps_to_bp_best'])} | "
                f"{fmt(c['dbp_seconds_to_bp_best'], 3)} | {fmt(c['steps_saved_fraction'], 3)} | "
                f"{fmt(c['time_saved_fraction'], 3)} | {fmt(c['emissions_saved_fraction'], 3)} | "
                f"{fmt(b.emissions_g, 3)} | {fmt(d.emissions_g, 3)} | {', '.join(busy) or 'no'} |"
            )
        steps, time_ = summary["steps_saved_fraction"], summary["time_saved_fraction"]
        over = [run["comparisons"][dbp] for run in runs]
        spread = max(run[bp].best_eval_loss for run in runs) - min(run[bp].best_eval_loss for run in runs)
        lines += [
            "",
            f"Over seeds: steps saved min {fmt(steps['min'], 3)}, mean {fmt(steps['mean'], 3)}; time saved "
            f"min {fmt(time_['min'], 3)}, mean {fmt(time_['mean'], 3)}, std {fmt(time_['std'], 3)}, max "
            f"{fmt(time_['max'], 3)} ({dbp} reached {bp}'s best in {time_['reached']} seeds).",
            "",
            f"Never worse? {dbp}'s eval loss minus {bp}'s (above 0: {dbp} worse), per seed: best "
            + " / ".join(fmt(c.get("best_eval_loss_over_bp")) for c in over)
            + ", last evaluation "
            + " / ".join(fmt(c.get("final_eval_loss_over_bp")) for c in over)
            + f"; the spread of {bp}'s own best over the seeds {fmt(spread)}.",
            "",
        ]
        worse = result["summary"].get("worse_than_bp", {}).get(dbp)
        if worse:
            lines += [f"**{dbp} left a worse model than {bp} here**: " + "; ".join(worse) + ".", ""]
    if runs and runs[0].get("speedup_curve"):
        baseline = next(m for m in methods if m not in runs[0]["speedup_curve"])
        lines += [
            f"**Speed-up curve** against {baseline}: steps and seconds to {baseline}'s best eval loss within 25%, "
            f"50%, 75% and 100% of its budget, as ratios to {baseline}'s (below 1 is faster; per seed, then the "
            "worst over seeds)",
            "",
            "| method | " + " | ".join(f"{f:.0%} steps | {f:.0%} seconds" for f in CURVE_FRACTIONS) + " |",
            "|" + " --- |" * (1 + 2 * len(CURVE_FRACTIONS)),
        ]
        for method in runs[0]["speedup_curve"]:
            cells = []
            for i in range(len(CURVE_FRACTIONS)):
                for key in ("steps_ratio", "seconds_ratio"):
                    values = [run["speedup_curve"][method][i][key] for run in runs]
                    worst = "never" if None in values else fmt(max(values), 3)
                    cells.append(" / ".join("never" if v is None else fmt(v, 3) for v in values) + f" (worst {worst})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(getattr(run[m], "mean_iou", None) is not None for run in runs for m in methods):
        lines += [
            "| seed | " + " | ".join(f"{m} mIoU (UperNet)" for m in methods) + " |",
            "|" + " --- |" * (1 + len(methods)),
        ]
        lines += [
            f"| {run['seed']} | " + " | ".join(fmt(getattr(run[m], "mean_iou", None)) for m in methods) + " |"
            for run in runs
        ]
        lines.append("")
    predicted = result["summary"].get("predictors")
    if predicted:
        lines += [
            f"What a user sees early (per seed): the decorrelation loss the BP run reports in its first {EARLY_STEPS} "
            "steps "
            + " / ".join(fmt(v, 3) for v in predicted["early_bp_decorrelation_loss"])
            + "; the share of BP's budget after which its eval loss was within 1% of its best "
            + " / ".join(fmt(v, 2) for v in predicted["bp_share_of_budget_to_within_1pct"])
            + "; BP's validation over training loss within a quarter of its budget (the shift ratio: how far the "
            "validation data lies from the training data) "
            + " / ".join(fmt(v, 2) for v in predicted.get("bp_shift_ratio", []))
            + ".",
            "",
        ]
    sweep = result.get("sweep")
    if sweep:
        lines += [
            "Learning-rate sweep (best eval loss, mean ± std over seeds; each method compared at its best):",
            "",
            "| base lr | " + " | ".join(methods) + " |",
            "|" + " --- |" * (1 + len(methods)),
        ]
        for lr in sweep["learning_rates"]:
            cells = []
            for method in methods:
                s = sweep["best_eval_loss"][method][f"{lr:g}"]
                mark = " (chosen)" if sweep["chosen"][method] == lr else ""
                cells.append(f"{fmt(s['mean'])} ± {fmt(s['std'], 2)}{mark}")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    with open(path, "w") as file:
        file.write("\n".join(lines).rstrip() + "\n")


COLORS = {
    "bp": "tab:blue",
    "dbp": "tab:orange",
    "bp_muon": "tab:green",
    "dbp_muon": "tab:red",
    "bp_soap": "tab:purple",
    "dbp_soap": "tab:brown",
    "bp_schedulefree": "tab:gray",
    "dbp_schedulefree": "tab:olive",
    "dbp_every2": "tab:pink",
    "dbp_every4": "tab:cyan",
}
"""Each method's colour in `comparison.png` (matplotlib's next colour for any other)."""


def plot(path: str, result: dict) -> None:
    """`comparison.png`: eval loss against training seconds, eval and train loss against steps, and the
    decorrelation loss, every method and seed (the first seed opaque)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in result["runs"]:
        for method in result.get("methods", ["bp", "dbp"]):
            r, color = run[method], COLORS.get(method)
            label = f"{method} seed {run['seed']}"
            alpha = 1.0 if run is result["runs"][0] else 0.45
            eval_steps, eval_losses = [e.step for e in r.evals], [e.eval_loss for e in r.evals]
            seconds, train_steps = [e.train_seconds for e in r.evals], [t.step for t in r.train]
            axes[0].plot(seconds, eval_losses, "o-", color=color, alpha=alpha, label=label, markersize=3)
            axes[1].plot(eval_steps, eval_losses, "o-", color=color, alpha=alpha, markersize=3)
            axes[1].plot(train_steps, [t.loss for t in r.train], ":", color=color, alpha=alpha)
            axes[2].plot(train_steps, [t.decorrelation_loss for t in r.train], color=color, alpha=alpha, label=label)
    axes[0].set(xlabel="training seconds", ylabel="eval loss", title="Eval loss against wall-clock")
    axes[1].set(xlabel="optimizer step", ylabel="loss", title="Eval (o-) and train (:) loss against steps")
    axes[2].set(xlabel="optimizer step", ylabel="decorrelation loss", title="Decorrelation loss", yscale="log")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(output_dir: str, result: dict) -> None:
    """comparison.json, comparison.md (printed too) and comparison.png in `output_dir`."""
    with open(os.path.join(output_dir, "comparison.json"), "w") as file:
        json.dump(result, file, indent=1, default=json_default)
    write_markdown(os.path.join(output_dir, "comparison.md"), result)
    plot(os.path.join(output_dir, "comparison.png"), result)
    print(open(os.path.join(output_dir, "comparison.md")).read())
    print(f"Written: {output_dir}/comparison.json, comparison.md, comparison.png")


def sweep_markdown(sweep: dict) -> str:
    """The table of a settings sweep (`sweep.md`) from its summary (`sweep.json`'s `baseline`, `seeds` and
    `variants`): every variant, best first, against the tuned baseline, mid-run (steps to the baseline's best) and at
    the end of its schedule (its final eval loss against the baseline's, with its share of the baseline's steps)."""
    baseline, variants = sweep["baseline"], sweep["variants"]
    lines = [
        f"Tuned baseline: `{baseline}` (lowest mean best eval loss over seeds {sweep['seeds']}). Steps to its best "
        "eval loss, per seed, and the fraction saved (never: the variant's best stayed above it); the final eval loss "
        "per seed and its difference from the baseline's final (at or below zero: the variant ended at least as low, "
        "in its share of the baseline's steps).",
        "",
        "| variant | mean best eval loss | best eval loss per seed | step of best | steps to the baseline's best "
        "| steps saved | min saved | share of the baseline's steps | final eval loss per seed (over the baseline's) |",
        "|" + " --- |" * 9,
    ]
    for text in sorted(variants, key=lambda t: variants[t]["mean_best_eval_loss"]):
        variant = variants[text]
        per_seed = variant["per_seed"].values()
        mark = " (baseline)" if text == baseline else ""
        lines.append(
            f"| `{text}`{mark} | {format_number(variant['mean_best_eval_loss'])} | "
            + " / ".join(format_number(p["best_eval_loss"]) for p in per_seed)
            + " | "
            + " / ".join(str(p["step_of_best"]) for p in per_seed)
            + " | "
            + " / ".join(
                format_number(p["steps_to_baseline_best"]) if p["steps_to_baseline_best"] else "never"
                for p in per_seed
            )
            + " | "
            + " / ".join(format_number(p["steps_saved_fraction"], 3) for p in per_seed)
            + f" | {format_number(variant['min_steps_saved_fraction'], 3)}"
            + f" | {format_number(variant.get('share_of_baseline_steps'), 3)} | "
            + " / ".join(
                f"{format_number(p.get('final_eval_loss'))} ({p.get('final_over_baseline_final', 0):+.4f})"
                for p in per_seed
            )
            + " |"
        )
    return "\n".join(lines)
