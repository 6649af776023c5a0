"""Plots of training records (`trainer.state.log_history`).

The segmentation figures (images, true and predicted masks) are the task's own: `hf_dbp.tasks.segmentation.plotting`.
"""

from __future__ import annotations

from collections.abc import Sequence


def _series(log_history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    records = [r for r in log_history if key in r and "step" in r]
    return [r["step"] for r in records], [r[key] for r in records]


def plot_training_curves(
    log_history: Sequence[dict], path: str, title: str = "MAE pre-training", empty_note: str | None = None
) -> str:
    """Write a PNG with the MAE loss (train and eval) and the decorrelation loss against optimizer steps.

    A panel with nothing to draw says so in its middle, followed by `empty_note` (e.g. why: "logged every 8 steps;
    the run took 4"), instead of staying blank."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    def say_empty(ax, what: str) -> None:
        ax.text(
            0.5,
            0.5,
            f"no {what} logged" + (f"\n({empty_note})" if empty_note else ""),
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )

    fig, (ax_loss, ax_decor) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = 0
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(log_history, key)
        if steps:
            ax_loss.plot(steps, values, style, label=label)
            drawn += 1
    ax_loss.set(xlabel="optimizer step", ylabel="MAE reconstruction loss", title="MAE loss")
    if drawn:
        ax_loss.legend()
    else:
        say_empty(ax_loss, "loss")
    ax_loss.grid(alpha=0.3)
    steps, values = _series(log_history, "decorrelation_loss")
    if steps:
        ax_decor.plot(steps, values, color="tab:green")
        ax_decor.set_yscale("log")
    else:
        say_empty(ax_decor, "decorrelation loss")
    ax_decor.set(xlabel="optimizer step", ylabel="mean over decorrelated layers", title="Decorrelation loss")
    ax_decor.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
