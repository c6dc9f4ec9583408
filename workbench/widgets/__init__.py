"""Widgets: sliders and selectors that redraw plots from results already computed. No science here."""

from .residual_norms import ResidualNormExplorer

__all__ = ["ResidualNormExplorer"]
