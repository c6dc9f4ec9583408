"""Residual-stream norms per layer and position, and the peaks on sink tokens.

Reproduces the *residual-state peaks* of "Active-Dormant Attention Heads:
Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (Guo et al., 2024):
sink tokens (usually the first) carry residual norms far above the median token's.
"""

from __future__ import annotations

import xarray as xr

from .common import require


def residual_norms(run: xr.Dataset, variable: str = "resid_pre") -> xr.DataArray:
    """L2 norm of the residual stream, ``||h_{l,p}||_2`` over ``d_model``.

    ``variable``: ``resid_pre`` (entering each layer) or ``resid_post`` (leaving it). A run
    with only the ``resid_norm`` probe (norms reduced during capture) serves ``resid_pre``.
    Dims: (sample, pos, layer, d_model) -> (sample, pos, layer); NaN on padding.
    """
    if variable == "resid_pre" and variable not in run and "resid_norm" in run:
        norms = run["resid_norm"].astype("float64").where(run["valid"])
        norms.name = "residual_norm"
        norms.attrs.update(long_name="||resid_pre||_2", source_variable="resid_norm")
        return norms
    resid = require(run, variable)
    norms = (resid.astype("float64") ** 2).sum("d_model", skipna=False) ** 0.5
    norms = norms.where(run["valid"])
    norms.name = "residual_norm"
    norms.attrs.update(long_name=f"||{variable}||_2", source_variable=variable)
    return norms


def residual_norm_peaks(run: xr.Dataset, variable: str = "resid_pre") -> xr.Dataset:
    """Each token's residual norm relative to the median token of its sample and layer.

    ``ratio[s, p, l] = ||h_{l,p}|| / median_{p'} ||h_{l,p'}||`` (valid positions only), and
    per (sample, layer) the position, token and ratio of the largest norm: the residual
    peak (Guo et al., 2024). Dims: -> ratio (sample, pos, layer); peak_* (sample, layer).
    """
    norms = residual_norms(run, variable)
    median = norms.median("pos", skipna=True)
    ratio = norms / median
    # (sample, layer) indices: computed now, so a lazy (dask-backed) run can be indexed by them
    peak_pos = ratio.fillna(-1.0).argmax("pos").reset_coords(drop=True).compute()
    at_peak = ratio.isel(pos=peak_pos)
    return xr.Dataset(
        {
            "norm": norms,
            "median_norm": median,
            "ratio_to_median": ratio,
            "peak_pos": peak_pos,
            "peak_ratio": at_peak.reset_coords(drop=True),
            "peak_token": at_peak["token"].reset_coords(drop=True),
        }
    )
