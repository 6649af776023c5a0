#!/usr/bin/env python
"""What DBP's gain does as the model and the training budget grow: the tables and the plot, from sweeps already run.

    python benchmarks/scaling.py --sizes outputs/scale/w96 outputs/scale/w192 outputs/scale/w384 \\
        --budgets outputs/scale/w96 outputs/scale/b1024 outputs/scale/b4096 \\
        --more outputs/scale/w96-photos outputs/scale/w384-photos --output_dir outputs/scaling

Each folder is one `examples/sweep_bp_dbp.py` sweep (its `sweep.json`) of one model, budget and data set, over the
same seeds: BP at its tuned rate (the sweep's baseline, the BP variant of the lowest mean best eval loss; tune each
method's rate on one seed first, bracketed from both sides), DBP at its own tuned rate (the full-budget DBP variant of
the lowest mean best eval loss), and, for the end-of-schedule measure, DBP at those settings given shares of BP's
steps: the same variant with `,max_steps=N` added (N = 0.5-0.8 times BP's steps; each run has its own warm-up and
cosine schedule). Per folder it reports:

- steps saved (mid-run): per seed, 1 - (DBP's first step at or below BP's best eval loss) / (BP's step of best);
- the end-of-schedule share: the smallest share of BP's steps whose DBP run ends (its final eval loss, after its
  last step) at or below BP's final eval loss, per seed and in every seed (DBP's full budget counts as share 1).
  BP's final is the lowest over the BP rates the sweep ran on all its seeds: add BP's runner-up rate to the seeds'
  sweep where the rate of BP's best mid-run loss is not the one of its best final loss (a BP that overfits late);
- compute: the floating-point operations of one BP optimizer step of the sweep's model at its batch, counted by
  torch's FlopCounterMode (forward and backward: the matrix products, which are nearly all of it), times BP's steps;
  DBP's operations per step over BP's (its fold, its statistics and the update of R included); and both measures
  in FLOPs: 1 - (DBP's steps / BP's) x (DBP's FLOPs per step / BP's), what a user pays rather than what DBP counts.

Along each axis (`--sizes`, `--budgets`: ordered by compute), each measure's least-squares trend against log2 of the
compute: its change per doubling, and where the line would cross zero (for a shrinking gain). `--more` adds points
(held-out sets) to the table and the plot without a trend. Writes scaling.json, scaling.md and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_dbp import ViTMAEDBPConfig, ViTMAEDBPForPreTraining

MAX_STEPS_OVERRIDE = re.compile(r",?max_steps=\d+")
EXTRA_POINTS = "more points"
"""The name of `--more`'s points (held-out sets, say) on the plot: points on no axis, so no trend and no line."""


def model_config(overrides: str) -> dict:
    """The model a sweep trained: its `--config_overrides` over ViTMAE's defaults, with the comparison's
    `norm_pix_loss` (as `examples/run_mae_dbp.py` builds it)."""
    config = ViTMAEConfig(norm_pix_loss=True)
    config.update_from_string(overrides)
    return {
        k: getattr(config, k)
        for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        + ("intermediate_size", "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads")
        + ("decoder_intermediate_size", "norm_pix_loss", "mask_ratio")
    }


def step_flops(overrides: str, batch: int, decorrelation_layers: list[str], seed: int = 0) -> dict[str, int]:
    """The operations of one optimizer step of BP and of DBP (forward, backward, and for DBP the decorrelation step)
    on `batch` random images of the sweep's model."""
    settings = model_config(overrides)
    flops = {}
    for method in ("bp", "dbp"):
        torch.manual_seed(seed)
        if method == "bp":
            model = ViTMAEForPreTraining(ViTMAEConfig(**settings))
        else:
            model = ViTMAEDBPForPreTraining(ViTMAEDBPConfig(**settings, decorrelation_layers=decorrelation_layers))
        model.train()
        size = settings["image_size"]
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with FlopCounterMode(display=False) as counter:
            model(pixel_values=pixels).loss.backward()
            if method == "dbp":
                model.decorrelation_step()
        flops[method] = counter.get_total_flops()
    return flops


def baseline_steps(sweep: dict) -> int:
    """BP's optimizer steps (the sweep reads them from each run: a budget may be in epochs)."""
    return sweep["variants"][sweep["baseline"]]["optimizer_steps"]


def measure_point(folder: str) -> dict:
    """One sweep's point: its model, budget and data, BP's and DBP's tuned variants, the steps saved per seed, the
    end-of-schedule shares and the compute."""
    with open(os.path.join(folder, "sweep.json")) as file:
        sweep = json.load(file)
    variants, baseline, settings = sweep["variants"], sweep["baseline"], sweep["settings"]
    seeds = [str(s) for s in sweep["seeds"]]
    steps = baseline_steps(sweep)
    full = {
        t: v for t, v in variants.items() if v["method"] == "dbp" and v.get("share_of_baseline_steps") in (None, 1)
    }
    if not full:
        raise ValueError(f"{folder}: the sweep has no DBP variant on BP's budget")
    dbp = min(full, key=lambda t: full[t]["mean_best_eval_loss"])
    shares = {1.0: variants[dbp]}
    for text, variant in variants.items():
        share = variant.get("share_of_baseline_steps")
        if variant["method"] == "dbp" and share is not None and share < 1:
            if MAX_STEPS_OVERRIDE.sub("", text).rstrip(":") == dbp.rstrip(":"):
                shares[share] = variant
            else:
                print(f"{folder}: {text!r} is not the tuned DBP ({dbp!r}) on fewer steps; left out of the shares")
    # The end of schedule is measured against BP's lowest final eval loss over every BP rate the sweep ran on all its
    # seeds, not only the tuned baseline's: a BP that overfits late (its best mid-run, its end worse) is no target.
    full_bp = [v for v in variants.values() if v["method"] == "bp" and v.get("share_of_baseline_steps") in (None, 1)]
    bp_final = {seed: min(v["per_seed"][seed]["final_eval_loss"] for v in full_bp) for seed in seeds}
    smallest = {}
    for seed in seeds:
        ended = [s for s, v in shares.items() if v["per_seed"][seed]["final_eval_loss"] <= bp_final[seed]]
        smallest[seed] = min(ended) if ended else None
    saved = [variants[dbp]["per_seed"][seed]["steps_saved_fraction"] for seed in seeds]
    every = None if None in smallest.values() else max(smallest.values())
    flops = step_flops(
        settings["config_overrides"], settings["per_device_train_batch_size"], settings["decorrelation_layers"]
    )
    model = model_config(settings["config_overrides"])
    ratio = flops["dbp"] / flops["bp"]
    return {
        "folder": folder,
        "width": model["hidden_size"],
        "blocks": model["num_hidden_layers"],
        "data": settings.get("train_dir") or settings.get("dataset_name") or settings.get("demo_photos"),
        "steps": steps,
        "seeds": seeds,
        "bp": baseline,
        "dbp": dbp,
        "bp_best_eval_loss": [variants[baseline]["per_seed"][s]["best_eval_loss"] for s in seeds],
        "bp_final_eval_loss": [bp_final[s] for s in seeds],
        "steps_saved": saved,
        "min_steps_saved": None if None in saved else min(saved),
        "shares_run": sorted(shares),
        "smallest_share": [smallest[s] for s in seeds],
        "smallest_share_every_seed": every,
        "end_of_schedule_saved": None if every is None else 1 - every,
        "bp_step_flops": flops["bp"],
        "dbp_step_flops_over_bp": ratio,
        "bp_run_flops": flops["bp"] * steps,
        # What a user pays: DBP's steps times its own FLOPs per step, against BP's run.
        "min_compute_saved": None if None in saved else 1 - (1 - min(saved)) * ratio,
        "end_of_schedule_compute_saved": None if every is None else 1 - every * ratio,
    }


def trend(points: list[dict], key: str) -> dict | None:
    """The least-squares line of `key` against log2 of BP's run FLOPs: its change per doubling of the compute, and
    the compute where it would reach zero (None when it does not shrink); None with fewer than two points."""
    pairs = [(math.log2(p["bp_run_flops"]), p[key]) for p in points if p[key] is not None]
    if len({x for x, _ in pairs}) < 2:
        return None
    mean_x = sum(x for x, _ in pairs) / len(pairs)
    mean_y = sum(y for _, y in pairs) / len(pairs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / sum((x - mean_x) ** 2 for x, _ in pairs)
    zero = mean_x - mean_y / slope if slope < 0 else None
    largest = max(x for x, _ in pairs)
    return {
        "points": len(pairs),
        "per_doubling": slope,
        "zero_at_flops": None if zero is None else 2**zero,
        "zero_doublings_past_largest": None if zero is None else zero - largest,
    }


MEASURES = {
    "min_steps_saved": "steps saved to BP's best (min over seeds)",
    "end_of_schedule_saved": "1 - smallest share ending at BP's final (every seed)",
    "min_compute_saved": "FLOPs saved to BP's best (min over seeds)",
    "end_of_schedule_compute_saved": "FLOPs saved at the smallest share (every seed)",
}
"""The measures of each point whose trend along an axis is fitted, and their names in the tables."""


def fraction(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def markdown(points: list[dict], trends: dict) -> str:
    lines = [
        "| width x blocks | steps | data | BP run TFLOP | DBP FLOPs per step over BP's | BP / DBP (tuned) "
        "| steps saved to BP's best (per seed) | min | FLOPs saved there | smallest share ending at or below BP's "
        "final (per seed; shares run) | in every seed | FLOPs saved there |",
        "|" + " --- |" * 12,
    ]
    for p in points:
        shares = " / ".join(fraction(s) for s in p["smallest_share"])
        lines.append(
            f"| {p['width']} x {p['blocks']} | {p['steps']} | {p['data']} | {p['bp_run_flops'] / 1e12:.3g} "
            f"| {p['dbp_step_flops_over_bp']:.3f} | `{p['bp']}` / `{p['dbp']}` "
            f"| {' / '.join(fraction(s) for s in p['steps_saved'])} | {fraction(p['min_steps_saved'])} "
            f"| {fraction(p['min_compute_saved'])} | {shares} ({', '.join(f'{s:.2f}' for s in p['shares_run'])}) "
            f"| {fraction(p['smallest_share_every_seed'])} | {fraction(p['end_of_schedule_compute_saved'])} |"
        )
    lines += ["", "| axis | measure | points | change per doubling of compute | crosses zero at |", "|" + " --- |" * 5]
    for axis, measures in trends.items():
        for key, t in measures.items():
            if t is None:
                continue
            zero = (
                "does not shrink"
                if t["zero_at_flops"] is None
                else f"{t['zero_at_flops'] / 1e12:.3g} TFLOP ({t['zero_doublings_past_largest']:.1f} doublings past "
                "the largest point)"
            )
            lines.append(f"| {axis} | {MEASURES[key]} | {t['points']} | {t['per_doubling']:+.3f} | {zero} |")
    return "\n".join(lines)


def plotted(point: dict, key: str, end_of_schedule: bool) -> float:
    """A point's measure as the plot draws it: a gap (nan) where it is "never", and at the end of the schedule where
    no share under BP's budget was run (DBP's full run alone measures no end-of-schedule saving)."""
    unmeasured = end_of_schedule and min(point["shares_run"]) == 1
    return float("nan") if point[key] is None or unmeasured else point[key]


def plot(path: str, axes_points: dict[str, list[dict]]) -> None:
    """Two panels, mid-run and end of schedule: each axis's points against BP's run FLOPs, the share of BP's steps
    saved (solid; mid-run with each seed's point) and of its FLOPs (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    measures = (
        ("steps_saved", "min_steps_saved", "min_compute_saved", "mid-run: to BP's best (min over seeds)"),
        (None, "end_of_schedule_saved", "end_of_schedule_compute_saved", "end of schedule: BP's final (every seed)"),
    )
    for panel, (per_seed, steps, compute, title) in zip(panels, measures, strict=True):
        end_of_schedule = per_seed is None
        labelled = set()
        for number, ((axis, points), marker) in enumerate(zip(axes_points.items(), "osd", strict=False)):
            points = sorted(points, key=lambda p: p["bp_run_flops"])
            xs = [p["bp_run_flops"] for p in points]

            # an axis's points are joined in order of compute; the extra points (other data, other axes) are not
            joined = axis != EXTRA_POINTS
            (line,) = panel.plot(
                xs,
                [plotted(p, steps, end_of_schedule) for p in points],
                marker=marker,
                linestyle="-" if joined else "none",
                label=f"{axis}: steps",
            )
            panel.plot(
                xs,
                [plotted(p, compute, end_of_schedule) for p in points],
                marker=marker,
                linestyle="--" if joined else "none",
                fillstyle="full" if joined else "none",
                color=line.get_color(),
                alpha=0.6,
                label=f"{axis}: FLOPs",
            )
            for p in points:
                seeds = [s for s in p[per_seed] if s is not None] if per_seed else []
                panel.scatter([p["bp_run_flops"]] * len(seeds), seeds, color=line.get_color(), alpha=0.3, s=12)
                if p["folder"] in labelled:  # a point on two axes is named once
                    continue
                labelled.add(p["folder"])
                label = f"{p['width']}x{p['blocks']}, {p['steps']} steps, {p['data']}"
                if not joined:  # extra points are named beside their marker, where they were measured
                    measured = plotted(p, steps, end_of_schedule)
                    if not math.isnan(measured):
                        panel.annotate(
                            label,
                            (p["bp_run_flops"], measured),
                            xytext=(-5, 0),
                            textcoords="offset points",
                            fontsize=6,
                            ha="right",
                            va="center",
                            color=line.get_color(),
                        )
                    continue
                # one axis's names along the bottom, the next's along the top: points of equal compute stay legible
                y, align = (0.02, "bottom") if number % 2 == 0 else (0.98, "top")
                panel.annotate(
                    label,
                    (p["bp_run_flops"], y),
                    xycoords=("data", "axes fraction"),
                    fontsize=6,
                    rotation=90,
                    va=align,
                    color=line.get_color(),
                )
        panel.axhline(0, color="grey", linewidth=0.8)
        panel.set_xscale("log", base=2)
        panel.set_xlabel("compute of BP's run (FLOPs)")
        panel.set_title(title, fontsize=10)
        panel.legend(fontsize=7)
    panels[0].set_ylabel("share of BP's steps / FLOPs that DBP saved")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=[], help="sweeps of growing models (one budget): a trend")
    parser.add_argument("--budgets", nargs="*", default=[], help="sweeps of growing budgets (one model): a trend")
    parser.add_argument("--more", nargs="*", default=[], help="more sweeps (held-out sets): points, no trend")
    parser.add_argument("--output_dir", default="outputs/scaling")
    args = parser.parse_args()
    if not (args.sizes or args.budgets or args.more):
        parser.error("give at least one sweep folder (--sizes, --budgets or --more)")
    for folder in {*args.sizes, *args.budgets, *args.more}:
        if not os.path.isfile(os.path.join(folder, "sweep.json")):
            parser.error(f"{folder} holds no sweep.json (a finished examples/sweep_bp_dbp.py sweep)")
    measured = {folder: measure_point(folder) for folder in dict.fromkeys([*args.sizes, *args.budgets, *args.more])}
    axes_points = {
        axis: sorted((measured[f] for f in folders), key=lambda p: p["bp_run_flops"])
        for axis, folders in (("model size", args.sizes), ("budget", args.budgets), (EXTRA_POINTS, args.more))
        if folders
    }
    trends = {
        axis: {key: trend(points, key) for key in MEASURES}
        for axis, points in axes_points.items()
        if axis != EXTRA_POINTS
    }
    os.makedirs(args.output_dir, exist_ok=True)
    points = sorted(measured.values(), key=lambda p: (p["data"], p["bp_run_flops"]))
    table = markdown(points, trends)
    with open(os.path.join(args.output_dir, "scaling.md"), "w") as file:
        file.write(table + "\n")
    with open(os.path.join(args.output_dir, "scaling.json"), "w") as file:
        json.dump({"points": points, "trends": trends}, file, indent=1)
    plot(os.path.join(args.output_dir, "scaling.png"), axes_points)
    print(table)
    print(f"Written: {args.output_dir}/scaling.json, scaling.md, scaling.png")


if __name__ == "__main__":
    main()
