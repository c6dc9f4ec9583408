"""Capture straight into a zarr store on disk: memory bounded by one batch, resumable, one writer.

``capture(..., out="runs/big.zarr")`` lands here. The samples are cut into blocks of
``batch_size`` consecutive samples; each block is run (its batch sorted by length), written as
whole zarr chunks (``sample`` chunked by the block, ``layer`` by one), and only then recorded as
done in a progress file. Nothing is written at ``out`` until the end: the store is built in
``.<name>.partial`` beside it (each block written by a second thread while the next one
computes, so at most two blocks are in memory), created whole (metadata, labels, attrs) by renaming a temp
folder, and swapped into place by renames once every block is done (an old run at ``out``,
replaced with ``overwrite=True``, is deleted last).

Killed at any moment (SIGKILL included), the same call continues: the progress file says which
blocks are done, and a block that was being written when the process died is simply written
again (zarr writes every chunk through a temp file and a rename, so no chunk is ever half
there; a block not yet recorded as done is rewritten whole). The progress file also holds a
fingerprint of the inputs (model, probes, options, the tokenised texts), so a rerun with
different inputs is refused rather than mixed in. The store's lock is held throughout
(:mod:`workbench.locks`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from .locks import exclusive
from .runs import (RunExistsError, check_replaceable, clear_leftovers, open_run, swap_into_place, write_text_atomic,
                   write_zarr)
from .schema import validate_run

FINGERPRINT_ATTR = "workbench_capture_fingerprint"
PROGRESS_FILE = "workbench_progress.json"  # in the staging store until every block is written


def check_store_path(out) -> Path:
    """``out`` must end in ``.zarr``: checked before anything is loaded or run."""
    out = Path(out).expanduser()
    if out.suffix != ".zarr":
        raise ValueError(f"{out}: a streamed capture is written to a .zarr store (or .nc, captured in memory by the "
                         "CLI); name the path PATH.zarr.")
    return out


def staging_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def fingerprint(plan) -> str:
    """What makes two captures the same capture: resuming one with another's inputs would mix them."""
    digest = hashlib.sha256()
    for text, (ids, _) in zip(plan.texts, plan.encoded):
        digest.update(text.encode("utf-8", errors="surrogatepass") + b"\0" + np.asarray(ids, np.int64).tobytes())
    model = plan.model
    return json.dumps({
        "model": model.name, "model_file_hash": model.file_hash, "dtype": str(model.dtype),
        "probes": [p.name for p in plan.probes], "backend": plan.backend, "batch_size": plan.batch_size,
        "top_k": plan.top_k, "add_special_tokens": plan.add_special_tokens, "residual_dtype": plan.residual_dtype,
        "samples": len(plan.texts), "inputs_sha256": digest.hexdigest(),
    }, sort_keys=True)


def capture_to_store(plan, out: Path, *, overwrite: bool, progress: bool) -> xr.Dataset:
    from .capturing import RunBuffers, run_attrs, run_coords, run_rows

    stage = staging_path(out)
    key = fingerprint(plan)
    n = len(plan.texts)
    blocks = [(a, min(a + plan.batch_size, n)) for a in range(0, n, plan.batch_size)]
    with exclusive(out):
        check_replaceable(out, overwrite)
        clear_leftovers(out)
        clear_leftovers(stage)  # temp folders of a store creation that was killed
        done = _resume_state(stage, key, overwrite)
        if done is None:
            _create(plan, stage, key, blocks, run_coords(plan), run_attrs(plan))
            done = set()
        total = sum(len(ids) for ids, _ in plan.encoded)
        finished = sum(len(plan.encoded[i][0]) for b in done for i in range(*blocks[b]))
        bar = tqdm(total=total, initial=finished, unit="tok", desc=f"capture -> {out.name}", disable=not progress)

        def write(block: xr.Dataset, index: int, a: int, b: int) -> None:
            block.to_zarr(stage, region={"sample": slice(a, b)}, mode="r+")
            done.add(index)  # recorded only once every chunk of the block is in place
            _write_progress(stage, key, len(blocks), done)

        # Each block is written by a second thread while the next one computes (at most two blocks
        # in memory); the next write starts only when the last one is recorded.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            for index, (a, b) in enumerate(blocks):
                if index in done:
                    continue
                buffers = RunBuffers(plan, b - a)
                run_rows(plan, range(a, b), buffers, bar, row_offset=a)
                buffers.check_range(plan.residual_dtype)
                block = xr.Dataset({name: (dims, buffers.arrays[name]) for name, dims in plan.variable_dims.items()})
                if pending is not None:
                    pending.result()
                pending = writer.submit(write, block, index, a, b)
            if pending is not None:
                pending.result()
        bar.close()
        _finish(stage, out)
    return open_run(out)


def _resume_state(stage: Path, key: str, overwrite: bool) -> set[int] | None:
    """Blocks already done in an unfinished capture of the same inputs, or None to start afresh."""
    if not stage.exists():
        return None
    progress_file = stage / PROGRESS_FILE
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        if progress.get("fingerprint") == key:
            return set(progress["done"])
    else:  # all blocks were done; killed before the swap: finished if it is this capture
        try:
            with xr.open_zarr(stage) as ds:
                if ds.attrs.get(FINGERPRINT_ATTR) == key:
                    return set(range(int(ds.attrs["workbench_blocks"])))
        except Exception:
            pass
    if not overwrite:
        theirs = json.loads(progress_file.read_text()).get("fingerprint", "{}") if progress_file.exists() else "{}"
        raise RunExistsError(
            f"{stage} holds an unfinished capture of other inputs ({_describe(theirs)}); run that capture again to "
            "finish it, or pass overwrite=True to discard it."
        )
    shutil.rmtree(stage)
    return None


def _describe(key: str) -> str:
    try:
        k = json.loads(key)
        return f"model {k['model']}, probes {','.join(k['probes'])}, {k['samples']} samples"
    except (ValueError, KeyError):
        return "unknown"


def _create(plan, stage: Path, key: str, blocks, coords: dict, attrs: dict) -> None:
    """Write the empty store (metadata, labels, attrs) in a temp folder and rename it to ``stage``."""
    sizes = plan.sizes()
    data_vars, chunks = {}, {}
    for name, dims in plan.variable_dims.items():
        shape = tuple(sizes[d] for d in dims)
        chunk = tuple(plan.batch_size if d == "sample" else 1 if d == "layer" else sizes[d] for d in dims)
        data_vars[name] = (dims, da.empty(shape, chunks=chunk, dtype=plan.dtype(name)))
        chunks[name] = dict(zip(dims, chunk))
    attrs = {**attrs, FINGERPRINT_ATTR: key, "workbench_blocks": len(blocks)}
    template = validate_run(xr.Dataset(data_vars, coords=coords, attrs=attrs))
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{stage.name}.tmp-", dir=stage.parent))
    try:
        write_zarr(template, tmp_dir / "store", compute=False, chunks=chunks)
        _write_progress(tmp_dir / "store", key, len(blocks), set())
        (tmp_dir / "store").rename(stage)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_progress(stage: Path, key: str, n_blocks: int, done: set[int]) -> None:
    write_text_atomic(stage / PROGRESS_FILE, json.dumps({"fingerprint": key, "blocks": n_blocks,
                                                          "done": sorted(done)}))


def _finish(stage: Path, out: Path) -> None:
    """Every block is done: drop the progress file (the store is now a finished run) and swap it in."""
    (stage / PROGRESS_FILE).unlink(missing_ok=True)
    swap_into_place(stage, out)

