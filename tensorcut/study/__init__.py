"""Truncation study: metrics, sweeps, recovery, figures.

``analyze(model, loader, out, ...)`` runs the sweeps into an SQLite results file;
``plot(results, out)`` draws the figures.
"""

from tensorcut.study.plots import plot
from tensorcut.study.sweep import AnalysisReport, analyze

__all__ = ["AnalysisReport", "analyze", "plot"]
