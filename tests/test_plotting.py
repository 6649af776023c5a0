"""The figures the scripts write: what a panel says when a run logged nothing for it."""

import matplotlib.figure
import pytest

from hf_dbp.training.plotting import plot_training_curves


def drawn_figure(monkeypatch, *args, **kwargs) -> matplotlib.figure.Figure:
    figures = []
    save = matplotlib.figure.Figure.savefig

    def keep(self, *save_args, **save_kwargs):
        figures.append(self)
        return save(self, *save_args, **save_kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_training_curves(*args, **kwargs)
    assert len(figures) == 1
    return figures[0]


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_a_run_shorter_than_the_logging_interval_says_why_its_panels_are_empty(tmp_path, monkeypatch):
    """4 steps logged every 8: no train loss and no decorrelation loss record. Each panel says what is missing and why,
    instead of staying blank; the eval loss, which was logged, is drawn."""
    history = [{"eval_loss": 0.7, "step": 4}]
    path = tmp_path / "curves.png"
    figure = drawn_figure(monkeypatch, history, str(path), empty_note="logged every 8 steps; the run took 4")
    loss_ax, decorrelation_ax = figure.axes
    assert texts(decorrelation_ax) == ["no decorrelation loss logged\n(logged every 8 steps; the run took 4)"]
    assert texts(loss_ax) == [] and len(loss_ax.lines) == 1  # the eval point
    assert path.stat().st_size > 0


@pytest.mark.parametrize("note", [None, "why"])
def test_full_panels_carry_no_note(tmp_path, monkeypatch, note):
    history = [
        {"loss": 1.0, "decorrelation_loss": 0.1, "step": 8},
        {"loss": 0.9, "decorrelation_loss": 0.05, "step": 16},
    ]
    figure = drawn_figure(monkeypatch, history, str(tmp_path / "curves.png"), empty_note=note)
    assert all(texts(ax) == [] for ax in figure.axes)
    assert all(len(ax.lines) == 1 for ax in figure.axes)


def test_nothing_logged_at_all_says_so_in_both_panels(tmp_path, monkeypatch):
    figure = drawn_figure(monkeypatch, [], str(tmp_path / "curves.png"))
    assert [texts(ax) for ax in figure.axes] == [["no loss logged"], ["no decorrelation loss logged"]]
