"""Widgets: sliders and selectors that redraw plots from results already computed. No science here."""

from .byte_lens import ByteLens
from .extreme_tokens import ExtremeTokenExplorer
from .geometry_explorer import GeometryExplorer
from .lens import LensExplorer
from .residual_norms import ResidualNormExplorer
from .tokenizer_explorer import TokenizerExplorer

__all__ = ["ByteLens", "ExtremeTokenExplorer", "GeometryExplorer", "LensExplorer", "ResidualNormExplorer", "TokenizerExplorer"]
