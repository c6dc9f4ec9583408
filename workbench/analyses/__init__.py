"""Analyses: pure functions from runs (xarray Datasets) to labelled results. No plotting, no files."""

from .common import MissingProbeError, require
from .residual_norms import residual_norm_peaks, residual_norms

__all__ = ["MissingProbeError", "require", "residual_norm_peaks", "residual_norms"]
