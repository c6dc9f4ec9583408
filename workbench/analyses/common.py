"""Checks shared by every analysis."""

from __future__ import annotations

import xarray as xr


class MissingProbeError(KeyError):
    """A run lacks a variable an analysis needs; the message names the probe and the command."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def require(run: xr.Dataset, variable: str, probe: str | None = None) -> xr.DataArray:
    """The run's ``variable``, or an error naming the probe to capture it with."""
    if variable not in run:
        probe = probe or variable
        raise MissingProbeError(
            f"this run has no {variable!r}: capture it with the {probe!r} probe, e.g. "
            f"wb.capture(model, texts, probes=[{probe!r}, ...]) or "
            f"`workbench capture --probes {probe} ...` (the run has: {', '.join(run.data_vars) or 'nothing'})."
        )
    return run[variable]
