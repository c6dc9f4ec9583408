"""The run schema: the one contract between captures and everything downstream.

A *run* is an ``xarray.Dataset``.

Dims (named the same everywhere)
    ``sample``   one input text
    ``pos``      token position in the sample (query position for attention)
    ``key_pos``  key position of attention (same positions as ``pos``)
    ``layer``    transformer block, 0 .. n_layers - 1
    ``head``     attention (query) head
    ``d_model``  residual-stream feature
    ``k``        rank in a top-k list

Coordinates (always present)
    ``sample``, ``pos``, ``key_pos``, ``layer``, ``head``, ``k``: integer indices
    ``text``       (sample)       the sample's text, as given (after any truncation)
    ``n_tokens``   (sample)       number of real tokens
    ``token_id``   (sample, pos)  token id, -1 on padding
    ``token``      (sample, pos)  the token decoded on its own ("" on padding)
    ``byte_start`` (sample, pos)  UTF-8 byte offset of the token's span in ``text``
    ``byte_end``   (sample, pos)  (a special token such as BOS has an empty span)
    ``valid``      (sample, pos)  True on real tokens, False on padding

Data variables: one or more per probe (``workbench.probes.PROBES`` lists them and
their dims). Float variables are NaN on padding, integer ones -1; nothing computed
from padding ever reaches a run. Residual-type variables have dims
(sample, pos, layer, d_model); attention ones (sample, layer, head, pos[, key_pos]).

Attrs (provenance)
    ``workbench_schema`` (int), ``model``, ``model_source``, ``model_file_hash``,
    ``architecture``, ``n_layers``, ``d_model``, ``n_heads``, ``n_kv_heads``,
    ``dtype``, ``device``, ``attn_implementation``, ``backend``,
    ``weight_processing``, ``probes`` (comma-separated), ``top_k``,
    ``add_special_tokens`` (0/1), ``truncated_samples`` (comma-separated indices, may be ""),
    ``package_versions`` (JSON), ``created`` (ISO 8601, UTC).
"""

from __future__ import annotations

import xarray as xr

SCHEMA_VERSION = 1

DIMS = ("sample", "pos", "key_pos", "layer", "head", "d_model", "k")
REQUIRED_COORDS = {
    "text": ("sample",),
    "n_tokens": ("sample",),
    "token_id": ("sample", "pos"),
    "token": ("sample", "pos"),
    "byte_start": ("sample", "pos"),
    "byte_end": ("sample", "pos"),
    "valid": ("sample", "pos"),
}
REQUIRED_ATTRS = (
    "workbench_schema",
    "model",
    "model_source",
    "model_file_hash",
    "architecture",
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "dtype",
    "device",
    "attn_implementation",
    "backend",
    "weight_processing",
    "probes",
    "top_k",
    "add_special_tokens",
    "truncated_samples",
    "package_versions",
    "created",
)


class InvalidRunError(ValueError):
    """A Dataset or store that does not follow the run schema."""


def validate_run(ds: xr.Dataset) -> xr.Dataset:
    """Check a Dataset against the schema; raise :class:`InvalidRunError` listing every problem."""
    if not isinstance(ds, xr.Dataset):
        raise InvalidRunError(f"a run is an xarray.Dataset, got {type(ds).__name__}")
    problems = []
    if "workbench_schema" not in ds.attrs:
        raise InvalidRunError("not a workbench run: the attr 'workbench_schema' is missing")
    if int(ds.attrs["workbench_schema"]) != SCHEMA_VERSION:
        problems.append(f"schema version {ds.attrs['workbench_schema']} (this workbench reads {SCHEMA_VERSION})")
    problems += [f"missing attr {a!r}" for a in REQUIRED_ATTRS if a not in ds.attrs]
    for name, dims in REQUIRED_COORDS.items():
        if name not in ds.coords:
            problems.append(f"missing coordinate {name!r}")
        elif ds[name].dims != dims:
            problems.append(f"coordinate {name!r} has dims {ds[name].dims}, expected {dims}")
    for name, var in ds.data_vars.items():
        odd = [d for d in var.dims if d not in DIMS]
        if odd:
            problems.append(f"variable {name!r} has unknown dims {odd}")
    if "layer" in ds.dims and ds.sizes["layer"] != int(ds.attrs.get("n_layers", ds.sizes["layer"])):
        problems.append(f"{ds.sizes['layer']} layers stored but attrs say {ds.attrs['n_layers']}")
    if "sample" in ds.dims and ds.sizes["sample"] == 0:
        problems.append("the run has no samples")
    if problems:
        raise InvalidRunError("invalid run: " + "; ".join(problems))
    return ds
