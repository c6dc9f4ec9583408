"""Save and open runs: zarr (primary, opened lazily) and netCDF.

Nothing is lost. A run is written beside its target and renamed into place, so an interrupted
save never leaves a half-written run; an existing run is replaced only with ``overwrite=True``
and then by renames (the old run is moved aside, the new one moved in, the old one deleted
last), and never when the path holds something that is not a workbench run. Every write holds
the path's lock (:mod:`workbench.locks`): a second writer is refused at once. Temp folders of
interrupted writes are removed by the next write of the same path.

Damage is never silent. Zarr runs are written in zarr format 3 with a CRC-32C checksum on every
chunk (zarr's ``crc32c`` codec), checked whenever the chunk is read, lazily too: a flipped bit
or a truncated chunk raises an error naming the variable. Each saved run also carries a SHA-256
of every variable (attr ``workbench_checksums``): ``verify=True`` (the default when opening
eagerly) checks them, which also catches a chunk that was deleted (zarr would read it as fill
values). A store missing a variable's data is an error on open. (A streamed capture is built
beside its path and appears there only when complete: :mod:`workbench.capture_store`.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from .locks import exclusive
from .schema import InvalidRunError, validate_run

FORMATS = {".zarr": "zarr", ".nc": "netcdf"}
CHECKSUMS_ATTR = "workbench_checksums"
ZARR_FORMAT = 3


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
    return _atomic_write(ds.assign_attrs(workbench_result=1), path, _format(path), overwrite)


def open_result(path: str | Path) -> xr.Dataset:
    """Read an analysis result written by :func:`save_result` into memory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no result at {path}.")
    try:
        if _format(path) == "zarr":
            return _restore_strings(xr.open_zarr(path).load())
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


def zarr_encoding(ds: xr.Dataset, chunks: dict[str, dict[str, int]] | None = None) -> dict[str, dict]:
    """Per-variable zarr encoding: a CRC-32C checksum on every chunk, zstd compression where it pays
    (``chunks``: optional ``{variable: {dim: size}}``)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    encoding = {}
    for name, var in ds.variables.items():
        # residual vectors are dense floats that zstd shrinks by ~1% at the cost of a pass over them:
        # stored raw (checksummed); everything else (patterns, ids, labels) compresses well
        raw = "d_model" in var.dims and var.dtype.kind == "f"
        enc = {"compressors": [Crc32cCodec()] if raw else [ZstdCodec(level=1), Crc32cCodec()]}
        if chunks and name in chunks:
            enc["chunks"] = tuple(chunks[name].get(d, ds.sizes[d]) for d in var.dims)
        encoding[str(name)] = enc
    return encoding


def as_variable_length_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width ``<U`` variables as Python strings: zarr format 3 specifies variable-length
    strings only (:func:`open_run` restores ``<U``)."""
    strings = {name: var for name, var in ds.variables.items() if var.dtype.kind == "U"}
    coords = {n: v.astype(object) for n, v in strings.items() if n in ds.coords}
    data = {n: v.astype(object) for n, v in strings.items() if n in ds.data_vars}
    return ds.assign_coords(coords).assign(data)


def write_zarr(ds: xr.Dataset, path: Path, *, compute: bool = True, chunks=None):
    """``ds.to_zarr`` in the workbench's format (zarr 3, checksummed chunks, consolidated metadata)."""
    ds = as_variable_length_strings(ds)
    with warnings.catch_warnings():  # consolidated metadata is zarr-python's extension to format 3: we read it back
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return ds.to_zarr(path, mode="w", zarr_format=ZARR_FORMAT, consolidated=True,
                          encoding=zarr_encoding(ds, chunks), compute=compute)


def _is_workbench_store(path: Path) -> bool:
    """Whether ``path`` holds a run or result written by the workbench (so it may be replaced)."""
    try:
        if path.is_dir():
            with xr.open_zarr(path) as ds:
                return "workbench_schema" in ds.attrs or "workbench_result" in ds.attrs
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return "workbench_schema" in ds.attrs or "workbench_result" in ds.attrs
    except Exception:
        return False


def clear_leftovers(path: Path) -> None:
    """Remove temp folders and files of interrupted writes of ``path`` (call while holding its lock)."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for leftover in path.parent.glob(pattern):
            _remove(leftover)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse to write over ``path`` unless ``overwrite`` and it is the workbench's own."""
    if not path.exists():
        return
    if not overwrite:
        raise RunExistsError(f"{path} already exists; choose another path or pass overwrite=True to replace it.")
    if not _is_workbench_store(path):
        raise RunExistsError(
            f"{path} exists and is not a run or result written by the workbench; it is left alone even with "
            "overwrite=True. Move or delete it yourself, or choose another path."
        )


def swap_into_place(new: Path, path: Path) -> None:
    """Move ``new`` to ``path`` by renames; an existing ``path`` is moved aside first and deleted last,
    so an interruption leaves the old run or the new one at ``path`` (the other beside it, hidden)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
    new.rename(path)
    if old is not None:
        _remove(old)


def _atomic_write(ds: xr.Dataset, path: Path, fmt: str, overwrite: bool) -> Path:
    """Write beside the target, then rename into place: never a half-written file at ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot write under {path.parent}: {err.strerror}; pick a writable folder.") from err
    with exclusive(path):
        check_replaceable(path, overwrite)
        clear_leftovers(path)
        try:
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        except OSError as err:
            raise PermissionError(f"cannot write under {path.parent}: {err.strerror}; pick a writable folder.") from err
        tmp = tmp_dir / path.name
        try:
            if fmt == "zarr":
                write_zarr(ds, tmp)
            else:
                ds.to_netcdf(tmp, engine="h5netcdf")
            swap_into_place(tmp, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _checksums(ds: xr.Dataset) -> dict[str, str]:
    return {
        str(name): hashlib.sha256(np.ascontiguousarray(var.values).tobytes()).hexdigest()
        for name, var in sorted(ds.variables.items(), key=lambda kv: str(kv[0]))
    }


def _restore_strings(ds: xr.Dataset) -> xr.Dataset:
    """Variable-length strings as stored in zarr format 3 back to numpy fixed-width ``<U``."""
    for name, var in ds.variables.items():
        if var.dtype.kind in ("T", "O"):
            values = np.asarray(var.values)
            if values.dtype.kind == "T":  # numpy casts StringDType only to an explicit width
                width = int(np.strings.str_len(values).max()) if values.size else 1
                values = values.astype(f"U{max(width, 1)}")
            else:
                values = values.astype(str)
            ds = ds.assign_coords({name: (var.dims, values, var.attrs)}) if name in ds.coords else ds.assign(
                {name: (var.dims, values, var.attrs)})
    return ds


def open_run(path: str | Path, *, lazy: bool = True, verify: bool | None = None) -> xr.Dataset:
    """Open a saved run; zarr opens lazily (dask) unless ``lazy=False``.

    Every chunk's CRC-32C is checked whenever it is read. ``verify`` (default: ``not lazy``)
    also reads every variable now and checks it against the SHA-256 written at save time.
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
        ds = _restore_strings(ds)
        validate_run(ds)
    except InvalidRunError as err:
        raise InvalidRunError(f"{path}: {err}") from None
    except Exception as err:  # a damaged string coordinate fails its checksum here
        raise InvalidRunError(f"{path} is damaged: {type(err).__name__}: {err}") from err
    expected = json.loads(ds.attrs.pop(CHECKSUMS_ATTR, "{}"))
    if fmt == "zarr":
        gone = [str(name) for name in ds.variables
                if not ((path / str(name) / "zarr.json").exists() or (path / str(name) / ".zarray").exists())]
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
