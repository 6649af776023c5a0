"""Plots of training records (`trainer.state.log_history`)."""

from __future__ import annotations

from collections.abc import Sequence


def _series(log_history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    records = [r for r in log_history if key in r and "step" in r]
    return [r["step"] for r in records], [r[key] for r in records]


def plot_training_curves(log_history: Sequence[dict], path: str, title: str = "MAE pre-training") -> str:
    """Write a PNG with the MAE loss (train and eval) and the decorrelation loss against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_decor) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(log_history, key)
        if steps:
            ax_loss.plot(steps, values, style, label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="MAE reconstruction loss", title="MAE loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    steps, values = _series(log_history, "decorrelation_loss")
    if steps:
        ax_decor.plot(steps, values, color="tab:green")
        ax_decor.set_yscale("log")
    ax_decor.set(xlabel="optimizer step", ylabel="mean over decorrelated layers", title="Decorrelation loss")
    ax_decor.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
