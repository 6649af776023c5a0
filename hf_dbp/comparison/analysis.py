"""The arithmetic of a comparison, on run records: when a run first reaches a loss, DBP's steps and seconds to BP's
best (and the fractions saved), the speed-up curve, what a user sees early in a BP run, a summary over seeds, and
each method's learning rate from a sweep."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from .records import Evaluation, RunRecord


def first_reaching(evals: list[Evaluation], target: float) -> Evaluation | None:
    """The first evaluation at or below `target` (the eval losses are measured on fixed masks)."""
    return next((r for r in evals if r.eval_loss <= target), None)


def compare(bp: RunRecord, dbp: RunRecord) -> dict:
    """DBP's optimizer steps, seconds (and emissions) to BP's best eval loss, and the fractions saved: steps are
    deterministic for a seed, seconds are what a user pays."""
    reached = first_reaching(dbp.evals, bp.best_eval_loss)
    out = {
        # Whether DBP left a worse model: its best and its last evaluation against BP's (above 0: worse).
        "best_eval_loss_over_bp": dbp.best_eval_loss - bp.best_eval_loss,
        "final_eval_loss_over_bp": dbp.evals[-1].eval_loss - bp.evals[-1].eval_loss,
        "dbp_steps_to_bp_best": None,
        "dbp_seconds_to_bp_best": None,
        "steps_saved_fraction": None,
        "time_saved_fraction": None,
        "emissions_saved_fraction": None,
    }
    if reached is not None:
        out["dbp_steps_to_bp_best"] = reached.step
        out["dbp_seconds_to_bp_best"] = reached.train_seconds
        out["steps_saved_fraction"] = 1 - reached.step / bp.step_of_best
        out["time_saved_fraction"] = 1 - reached.train_seconds / bp.seconds_to_best
        if reached.emissions_g is not None and bp.emissions_g_to_best:
            out["emissions_saved_fraction"] = 1 - reached.emissions_g / bp.emissions_g_to_best
    return out


CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
"""The shares of the baseline's budget at which the speed-up curve takes its best eval loss as the target."""


def speedup_curve(baseline: RunRecord, other: RunRecord) -> list[dict]:
    """For targets = the baseline's best eval loss within 25%, 50%, 75% and 100% of its budget (in steps): the steps
    and seconds each needs to reach it, and their ratios (other / baseline; below 1 is faster). A late plateau of the
    baseline decides only the last point."""
    budget = max(r.step for r in baseline.evals)
    points = []
    for fraction in CURVE_FRACTIONS:
        seen = [r for r in baseline.evals if r.step <= fraction * budget] or baseline.evals[:1]
        target = min(r.eval_loss for r in seen)
        base, mine = first_reaching(baseline.evals, target), first_reaching(other.evals, target)
        point = {
            "fraction": fraction,
            "target_eval_loss": target,
            "baseline_step": base.step,
            "baseline_seconds": base.train_seconds,
            "step": None,
            "seconds": None,
            "steps_ratio": None,
            "seconds_ratio": None,
        }
        if mine is not None:
            point.update(
                step=mine.step,
                seconds=mine.train_seconds,
                steps_ratio=mine.step / base.step,
                seconds_ratio=mine.train_seconds / base.train_seconds if base.train_seconds else None,
            )
        points.append(point)
    return points


EARLY_STEPS = 32
"""What a user sees early in a BP run: its records up to this step."""


def shift_ratio(record: RunRecord, share: float = 0.25) -> float | None:
    """How far the validation data lies from the training data, as a BP run sees it within `share` of its budget:
    its eval loss at the last evaluation by then over its mean training loss in the eighth of the budget before it
    (near 1 or below: validation images of the training images' kind). Reported for the user to read, not as a
    verdict: on the sets of docs/results.md ("Can a user tell before training?") it did not single out the one split
    where DBP's last model was worse. None without the records."""
    budget = max(r.step for r in record.evals)
    seen = [r for r in record.evals if r.step <= share * budget]
    window = [t.loss for t in record.train if share * budget / 2 < t.step <= share * budget and t.loss is not None]
    if not seen or not window:
        return None
    return seen[-1].eval_loss / statistics.mean(window)


def predictors(runs: list[dict], bp: str) -> dict:
    """What a user can measure on their data before DBP's result is known, per seed: the decorrelation loss that the
    BP run reports in its first `EARLY_STEPS` steps (the mean of those records), the share of BP's budget at which
    its eval loss came within 1% of its best (small: BP flattens early and leaves little to catch up with), and the
    validation-over-training loss of BP within a quarter of its budget (`shift_ratio`: large when the validation data
    lies away from the training data).

    Args:
        runs (`list[dict]`):
            One per seed: each method's name -> its `RunRecord`.
        bp (`str`):
            The method whose records are read.
    """
    out = {"early_bp_decorrelation_loss": [], "bp_share_of_budget_to_within_1pct": [], "bp_shift_ratio": []}
    for run in runs:
        out["bp_shift_ratio"].append(shift_ratio(run[bp]))
        early = [
            t.decorrelation_loss for t in run[bp].train if t.step <= EARLY_STEPS and t.decorrelation_loss is not None
        ]
        out["early_bp_decorrelation_loss"].append(statistics.mean(early) if early else None)
        evals, best = run[bp].evals, run[bp].best_eval_loss
        near = first_reaching(evals, best * 1.01)
        out["bp_share_of_budget_to_within_1pct"].append(near.step / max(r.step for r in evals))
    return out


def worse_than_bp(runs: list[dict], bp: str, dbp: str) -> list[str]:
    """The seeds where `dbp` left a model worse than `bp`'s by more than the spread of `bp`'s own best eval loss over
    the seeds (its best, or its last evaluation), as lines to warn with; [] where it never did."""
    best = [run[bp].best_eval_loss for run in runs]
    spread = max(best) - min(best)
    lines = []
    for run in runs:
        for key, what in (("best_eval_loss_over_bp", "best"), ("final_eval_loss_over_bp", "last")):
            over = run["comparisons"][dbp][key]
            if over > spread:
                lines.append(
                    f"seed {run['seed']}: {dbp}'s {what} eval loss is {over:.4f} above {bp}'s (spread {spread:.4f})"
                )
    return lines


def summarize(values: list) -> dict:
    """Mean, standard deviation, minimum and maximum of the known values (None: never reached), and how many of
    them are known (`reached`, e.g. "2/3")."""
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "std": None, "min": None, "max": None, "reached": f"0/{len(values)}"}
    return {
        "mean": statistics.mean(known),
        "std": statistics.stdev(known) if len(known) > 1 else 0.0,
        "min": min(known),
        "max": max(known),
        "reached": f"{len(known)}/{len(values)}",
    }


def choose_learning_rates(
    methods: list[str], seeds: list[int], sweep: list[float], best_eval_loss: Callable[[int, str, float], float]
) -> dict:
    """Each method's best rate of `sweep`: the lowest mean over `seeds` of `best_eval_loss(seed, method, rate)`.
    Returns the sweep's record: the rates, each method's chosen one, and its losses (mean, std, ...) at every rate."""
    result = {"learning_rates": sweep, "chosen": {}, "best_eval_loss": {}}
    for method in methods:
        losses = {lr: [best_eval_loss(seed, method, lr) for seed in seeds] for lr in sweep}
        result["best_eval_loss"][method] = {f"{lr:g}": summarize(values) for lr, values in losses.items()}
        result["chosen"][method] = min(sweep, key=lambda lr, losses=losses: statistics.mean(losses[lr]))
    return result


def summarize_pairs(runs: list[dict], pairs: list[tuple[str, str]], methods: list[str]) -> dict:
    """A comparison's summary over its seeds' `runs`: steps, time and emissions saved by the first DBP against its
    BP (at the top level) and by every DBP of `pairs` against its own (`comparisons`), how many runs were busy, and
    the predictors read from the first BP."""
    keys = ("steps_saved_fraction", "time_saved_fraction", "emissions_saved_fraction")
    summary = {key: summarize([r["comparison"][key] for r in runs]) for key in keys}
    summary["comparisons"] = {
        dbp: {key: summarize([r["comparisons"][dbp][key] for r in runs]) for key in keys} for _, dbp in pairs
    }
    summary["busy_runs"] = sum(bool(r[m].machine.busy) for r in runs for m in methods)
    summary["predictors"] = predictors(runs, pairs[0][0])
    return summary
