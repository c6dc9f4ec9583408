"""Plots: plotly figures from analysis results. No metric is computed here."""

from .residual_norms import residual_norm_by_position, residual_norm_heatmap, residual_norm_profile
from .theme import COLUMN_WIDTH_PX, publication_layout

__all__ = ["COLUMN_WIDTH_PX", "publication_layout", "residual_norm_by_position", "residual_norm_heatmap", "residual_norm_profile"]
