"""Figures show only what was given (issue 12): no backdoor panel or ASR line without backdoor
data, and the stop line names the threshold actually used."""

from __future__ import annotations

import numpy as np
import pytest

from fineprune_tf import reporting


@pytest.fixture
def saved(monkeypatch):
    """The figures the plotting functions save, as ``{path name: figure}``."""
    figures = {}

    def keep(figure, path):
        figures[str(path).rsplit("/", 1)[-1]] = figure

    monkeypatch.setattr(reporting, "_save_figure", keep)
    return figures


def _panel_titles(figure) -> list[str]:
    return [axis.get_title() for axis in figure.axes if axis.get_title()]


def test_activations_without_backdoor_data_has_one_panel(saved, tmp_path):
    reporting.plot_activations(np.arange(10.0), None, tmp_path / "activations.png")
    assert _panel_titles(saved["activations.png"]) == ["(a) Clean Activations"]


def test_activations_with_backdoor_data_has_both_panels(saved, tmp_path):
    reporting.plot_activations(np.arange(10.0), np.ones(10), tmp_path / "activations.png")
    assert _panel_titles(saved["activations.png"]) == [
        "(a) Clean Activations",
        "(b) Backdoor Activations",
    ]


def _legend(figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_pruning_curve_without_backdoor_data_draws_no_asr(saved, tmp_path):
    curve = {"clean_acc": [0.9, 0.9, 0.8], "asr": [None, None, None]}
    reporting.plot_pruning_curve(curve, 4, tmp_path / "curve.png", stop=1, threshold=2.0)
    assert _legend(saved["curve.png"]) == [
        "Clean Classification Accuracy",
        "stop (2-point accuracy drop)",
    ]


def test_pruning_curve_with_backdoor_data_and_no_stop(saved, tmp_path):
    curve = {"clean_acc": [0.9, 0.9, 0.8], "asr": [1.0, 0.5, 0.2]}
    reporting.plot_pruning_curve(curve, 4, tmp_path / "curve.png")
    assert _legend(saved["curve.png"]) == [
        "Clean Classification Accuracy",
        "Backdoor Attack Success",
    ]
