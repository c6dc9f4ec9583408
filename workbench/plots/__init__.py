"""Plots: plotly figures from analysis results. No metric is computed here."""

from .byte_level import (
    bias_along_text_figure,
    bits_per_byte_figure,
    covers_table,
    next_byte_bars,
    prompt_cut_figure,
)
from .extreme_tokens import (
    condition_bars,
    head_state_map,
    massive_activation_map,
    massive_activation_profile,
    scaling_curves,
    sink_score_by_domain,
    sink_score_heatmap,
    value_norm_vs_attention,
)
from .next_token_law import (
    contribution_figure,
    future_token_figure,
    law_figure,
    lens_comparison_figure,
    lens_heatmap,
    lens_top_k_figure,
)
from .residual_norms import residual_norm_by_position, residual_norm_heatmap, residual_norm_profile
from .theme import COLUMN_WIDTH_PX, publication_layout

__all__ = [
    "COLUMN_WIDTH_PX",
    "bias_along_text_figure",
    "bits_per_byte_figure",
    "covers_table",
    "next_byte_bars",
    "prompt_cut_figure",
    "condition_bars",
    "contribution_figure",
    "future_token_figure",
    "head_state_map",
    "law_figure",
    "lens_comparison_figure",
    "lens_heatmap",
    "lens_top_k_figure",
    "massive_activation_map",
    "massive_activation_profile",
    "publication_layout",
    "residual_norm_by_position",
    "residual_norm_heatmap",
    "residual_norm_profile",
    "scaling_curves",
    "sink_score_by_domain",
    "sink_score_heatmap",
    "value_norm_vs_attention",
]
