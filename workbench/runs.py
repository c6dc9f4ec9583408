"""Save and open runs: zarr (primary, opened lazily) and netCDF.

Writes are atomic: a run is written beside its target and renamed into place, so an
interrupted save never leaves a half-written run, and an existing run is never
overwritten unless ``overwrite=True``. Each saved run carries a SHA-256 of every
variable (attr ``workbench_checksums``); opening eagerly, or with ``verify=True``,
checks them, so a damaged store is an error rather than silently wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from .schema import InvalidRunError, validate_run

FORMATS = {".zarr": "zarr", ".nc": "netcdf"}
CHECKSUMS_ATTR = "workbench_checksums"


class RunExistsError(FileExistsError):
    pass


def _format(path: Path) -> str:
    try:
        return FORMATS[path.suffix]
    except KeyError:
        raise ValueError(
            f"{path}: a run path ends in .zarr (recommended) or .nc, not {path.suffix or 'nothing'!r}."
        ) from None


def save_run(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a run to ``path`` (``.zarr`` or ``.nc``) and return the path."""
    path = Path(path).expanduser()
    fmt = _format(path)
    validate_run(ds)
    ds = ds.assign_attrs({CHECKSUMS_ATTR: json.dumps(_checksums(ds))})
    return _atomic_write(ds, path, fmt, overwrite)


def save_result(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an analysis result (any Dataset, not a run) to ``.nc`` or ``.zarr``, atomically."""
    path = Path(path).expanduser()
    return _atomic_write(ds, path, _format(path), overwrite)


def open_result(path: str | Path) -> xr.Dataset:
    """Read an analysis result written by :func:`save_result` into memory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no result at {path}.")
    try:
        if _format(path) == "zarr":
            return xr.open_zarr(path).load()
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return ds.load()
    except Exception as err:  # damaged or foreign file
        raise InvalidRunError(f"{path} could not be read as a result ({type(err).__name__}: {err}).") from err


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file in the same folder and a rename: a reader (or an
    interrupted write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _atomic_write(ds: xr.Dataset, path: Path, fmt: str, overwrite: bool) -> Path:
    """Write beside the target, then rename into place: never a half-written file at ``path``."""
    if path.exists() and not overwrite:
        raise RunExistsError(f"{path} already exists; choose another path or pass overwrite=True to replace it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise PermissionError(f"cannot write under {path.parent}: {err.strerror}; pick a writable folder.") from err
    tmp = tmp_dir / path.name
    try:
        if fmt == "zarr":
            # zarr format 2: a stable spec for fixed-width strings and consolidated metadata
            ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
        else:
            ds.to_netcdf(tmp, engine="h5netcdf")
        if path.exists():  # only reached with overwrite=True
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _checksums(ds: xr.Dataset) -> dict[str, str]:
    return {
        str(name): hashlib.sha256(np.ascontiguousarray(var.values).tobytes()).hexdigest()
        for name, var in sorted(ds.variables.items(), key=lambda kv: str(kv[0]))
    }


def open_run(path: str | Path, *, lazy: bool = True, verify: bool | None = None) -> xr.Dataset:
    """Open a saved run; zarr opens lazily (dask) unless ``lazy=False``.

    ``verify`` (default: ``not lazy``) reads every variable and checks it against the
    checksums written at save time.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no run at {path}; `workbench demo` writes one under runs/.")
    fmt = _format(path)
    try:
        if fmt == "zarr":
            ds = xr.open_zarr(path, chunks={} if lazy else None)
        else:
            ds = xr.open_dataset(path, engine="h5netcdf", chunks={} if lazy else None)
    except Exception as err:  # zarr/h5 raise many types for damaged or foreign stores
        raise InvalidRunError(f"{path} could not be read as a {fmt} run ({type(err).__name__}: {err}).") from err
    try:
        validate_run(ds)
    except InvalidRunError as err:
        raise InvalidRunError(f"{path}: {err}") from None
    expected = json.loads(ds.attrs.pop(CHECKSUMS_ATTR, "{}"))
    if fmt == "zarr":
        gone = [str(name) for name in ds.variables if not (path / str(name) / ".zarray").exists()]
        if gone:
            raise InvalidRunError(f"{path} is damaged: the data of {', '.join(gone)} is missing.")
    if verify if verify is not None else not lazy:
        try:
            ds = ds.load()
        except Exception as err:
            raise InvalidRunError(f"{path} is damaged: {type(err).__name__}: {err}") from err
        actual = _checksums(ds)
        bad = sorted(name for name, digest in expected.items() if actual.get(name) != digest)
        if bad:
            raise InvalidRunError(f"{path} is damaged: {', '.join(bad)} differ from what was saved.")
    elif not lazy:
        ds = ds.load()
    return ds
