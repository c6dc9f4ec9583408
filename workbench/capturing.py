"""Run texts through a model with probes and return a labelled run (an xarray.Dataset).

The run's layout is written down once, in :mod:`workbench.schema`.
"""

from __future__ import annotations

import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .models import ModelHandle, package_versions
from .probes import (
    DEFAULT_PROBES,
    BatchCollector,
    BatchContext,
    check_backend,
    check_probes_supported,
    resolve_probes,
    run_batch,
    w_o_factor_getter,
)
from .schema import SCHEMA_VERSION, validate_run


class InputTooLongError(ValueError):
    pass


RESIDUAL_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class CapturePlan:
    """Everything decided before the first forward pass: inputs checked, texts tokenised."""

    model: ModelHandle
    texts: list[str]
    encoded: list[tuple[list[int], np.ndarray]]  # token ids, (n, 2) UTF-8 byte spans
    probes: list
    backend: str
    batch_size: int
    top_k: int
    add_special_tokens: bool
    truncated: list[int]
    residual_dtype: str
    remote: bool | str = False  # nnsight remote execution (True: NDIF; "local": nnsight's local simulation)

    @property
    def variable_dims(self) -> dict[str, tuple[str, ...]]:
        return {v.name: v.dims for p in self.probes for v in p.variables}

    @property
    def width(self) -> int:
        return max(len(ids) for ids, _ in self.encoded)

    def sizes(self, n_samples: int | None = None) -> dict[str, int]:
        m = self.model
        return {"sample": len(self.texts) if n_samples is None else n_samples, "pos": self.width,
                "key_pos": self.width, "layer": m.n_layers, "head": m.n_heads, "d_model": m.d_model, "k": self.top_k}

    @property
    def shared_residual(self) -> bool:
        # resid_post[l] is resid_pre[l + 1] (one layer's output is the next one's input): with both
        # probes the run keeps one (layer + 1)-deep residual array and both variables are views of it
        return {"resid_pre", "resid_post"} <= set(self.variable_dims)

    def dtype(self, name: str):
        if name == "top_k_ids":
            return np.int64
        return RESIDUAL_DTYPES[self.residual_dtype] if "d_model" in self.variable_dims[name] else np.float32


def capture(
    model: ModelHandle,
    texts: str | list[str],
    probes=DEFAULT_PROBES,
    *,
    backend: str = "torch",
    batch_size: int = 8,
    max_tokens: int | None = None,
    truncate: bool = False,
    top_k: int = 5,
    add_special_tokens: bool = True,
    residual_dtype: str = "float32",
    out=None,
    overwrite: bool = False,
    progress: bool = True,
    remote: bool | str = False,
) -> xr.Dataset:
    """Capture ``probes`` for every text and return a run following :mod:`workbench.schema`.

    ``texts``: a string, a list of strings, or a list of token-id lists (pre-tokenised prompts,
    e.g. shuffled ones, run exactly as given; the run's text is then each token's decoded
    string concatenated, and its byte spans index into that).

    ``backend``: ``"torch"`` (PyTorch hooks placed by the site map, the default),
    ``"nnsight"`` (the same sites through nnsight tracing) or ``"transformer_lens"``
    (TransformerBridge); all three store the same numbers. Texts are tokenised, batched by length
    with right padding, and padding is masked out of every result. A text longer than
    ``max_tokens`` (default: the model's context) is an error unless ``truncate=True``,
    which keeps its first ``max_tokens`` tokens and warns how many were dropped.

    ``out``: a ``.zarr`` path to stream the run to, batch by batch, instead of holding it in
    memory (memory bounded by one batch, whatever the corpus size); an interrupted capture
    (SIGKILL included) continues where it stopped when run again with the same arguments. The
    run is returned opened lazily. In memory, ``resid_pre`` and ``resid_post`` share one array
    (``resid_post[l]`` is ``resid_pre[l + 1]``): copy one before editing it in place.
    ``residual_dtype="float16"`` stores the probes with a
    ``d_model`` dimension (residuals, updates) at half the size (recorded in the run's attrs;
    values beyond float16's range are an error).

    ``remote=True`` (with ``backend="nnsight"``): run the forward passes on NDIF's servers through
    nnsight's remote execution, for a hosted model loaded here without weights
    (``load_model(hub_id, allow_download=True, remote=True)``; set nnsight's API key first:
    ``nnsight.CONFIG.set_default_api_key(...)``). Only module outputs and inputs travel back; the probes
    are computed here. ``value_norm`` reads W_O, which a remote model has not here. ``remote="local"`` runs
    the same requests through nnsight's local simulation on a model whose weights are here.
    """
    if out is not None:
        from .capture_store import check_store_path

        out = check_store_path(out)
    plan = plan_capture(model, texts, probes, backend=backend, batch_size=batch_size, max_tokens=max_tokens,
                        truncate=truncate, top_k=top_k, add_special_tokens=add_special_tokens,
                        residual_dtype=residual_dtype, remote=remote)
    if out is not None:
        from .capture_store import capture_to_store

        return capture_to_store(plan, out, overwrite=overwrite, progress=progress)
    buffers = RunBuffers(plan, len(plan.texts))
    bar = tqdm(total=sum(len(ids) for ids, _ in plan.encoded), unit="tok", desc=f"capture ({backend})",
               disable=not progress)
    run_rows(plan, range(len(plan.texts)), buffers, bar)
    bar.close()
    buffers.check_range(plan.residual_dtype)
    data_vars = {name: (dims, buffers.arrays[name]) for name, dims in plan.variable_dims.items()}
    ds = xr.Dataset(data_vars, coords=run_coords(plan), attrs=run_attrs(plan))
    return validate_run(ds)


def plan_capture(model, texts, probes, *, backend, batch_size, max_tokens, truncate, top_k, add_special_tokens,
                 residual_dtype, remote: bool | str = False) -> CapturePlan:
    """Check every input and tokenise the texts: all errors come here, before any forward pass."""
    check_backend(backend)
    texts = _check_texts(texts)
    probe_list = resolve_probes(probes)
    check_probes_supported(model, probe_list)
    _check_remote(model, backend, remote, probe_list)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    if residual_dtype not in RESIDUAL_DTYPES:
        raise ValueError(f"residual_dtype must be one of {sorted(RESIDUAL_DTYPES)}, got {residual_dtype!r} "
                         "(bfloat16 has no numpy or zarr type: use float16, or float32 for values beyond 65504).")
    if any(p.needs_attention_probs for p in probe_list) and model.attn_implementation != "eager":
        warnings.warn(
            f"{model.name} uses {model.attn_implementation!r} attention, which returns no probabilities; "
            "switching it to 'eager' for this capture.",
            stacklevel=3,
        )
        model.hf_model.set_attn_implementation("eager")
    limit = max_tokens or model.max_context

    if isinstance(texts[0], list):  # pre-tokenised: used as given (no special tokens added)
        texts, encoded = _pretokenised(model.tokenizer, texts)
    else:
        encoded = _encode(model.tokenizer, texts, add_special_tokens)
    truncated = [i for i, e in enumerate(encoded) if len(e[0]) > limit]
    if truncated and not truncate:
        worst = max(truncated, key=lambda i: len(encoded[i][0]))
        raise InputTooLongError(
            f"{len(truncated)} text(s) exceed {limit} tokens (text {worst} has {len(encoded[worst][0])}). "
            "Split them, or pass truncate=True to keep the first tokens."
        )
    if truncated:
        dropped = sum(len(encoded[i][0]) - limit for i in truncated)
        warnings.warn(f"truncated {len(truncated)} text(s) to {limit} tokens, dropping {dropped} tokens.", stacklevel=3)
        for i in truncated:
            ids, offsets = encoded[i]
            encoded[i] = (ids[:limit], offsets[:limit])
            texts[i] = texts[i].encode()[: offsets[limit - 1][1]].decode("utf-8", errors="ignore")
    empty = [i for i, e in enumerate(encoded) if len(e[0]) == 0]
    if empty:
        raise ValueError(f"text(s) {empty} produced no tokens; remove them or add text.")
    return CapturePlan(model, texts, encoded, probe_list, backend, batch_size, top_k, add_special_tokens, truncated,
                       residual_dtype, remote)


def _check_remote(model, backend: str, remote, probes) -> None:
    """Remote execution asked for (or needed) the way it can run, before any forward pass."""
    weightless = model.device.type == "meta"
    if remote not in (False, True, "local"):
        raise ValueError(f"remote must be False, True (NDIF) or 'local' (nnsight's local simulation), got {remote!r}.")
    if remote and backend != "nnsight":
        raise ValueError("remote execution runs through nnsight: pass backend='nnsight'.")
    if weightless and remote is not True:
        raise ValueError(f"{model.name} has no weights here (loaded with remote=True): capture it with "
                         "backend='nnsight', remote=True.")
    if remote is True and (not model.hub_id or Path(model.hub_id).expanduser().exists()):
        raise ValueError(f"{model.name}: remote execution needs the hub id the server knows the model by; "
                         "load it with load_model('<org>/<name>', allow_download=True, remote=True).")
    if weightless and any(p.name == "value_norm" for p in probes):
        raise ValueError("value_norm reads the attention output weights W_O, which a remote model has not here; "
                         "leave it out or load the weights.")


def run_rows(plan: CapturePlan, rows, buffers: "RunBuffers", bar, row_offset: int = 0) -> None:
    """Run the samples ``rows`` (batched by length) and write their probes into ``buffers``, whose
    row 0 is sample ``row_offset``."""
    model = plan.model
    skip = (frozenset(("resid_post", layer) for layer in range(model.n_layers - 1)) if plan.shared_residual
            else frozenset())
    order = sorted(rows, key=lambda i: -len(plan.encoded[i][0]))
    factor = w_o_factor_getter(model)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    def finish_batch(collector: BatchCollector, batch: list[int], lengths: list[int]) -> None:
        collector.finish()
        buffers.mask_padding(batch, lengths)
        bar.update(sum(lengths))

    # On a GPU, a batch is stored by a second thread while this one queues the next batch: the host's
    # work per batch then overlaps the GPU's instead of adding to it. At most one batch is being stored.
    # On the CPU the forward pass is the work, and each batch is stored as soon as it is done.
    device = torch.device("cpu") if plan.remote else model.device  # remote: what travels starts and ends here
    storing = ThreadPoolExecutor(1, thread_name_prefix="workbench-store") if device.type == "cuda" else None
    stored = None  # the future of the batch being stored
    try:
        for start in range(0, len(order), plan.batch_size):
            samples = order[start : start + plan.batch_size]
            batch = [i - row_offset for i in samples]
            lengths = [len(plan.encoded[i][0]) for i in samples]
            input_ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
            valid = torch.zeros(input_ids.shape, dtype=torch.bool)
            for row, i in enumerate(samples):
                input_ids[row, : lengths[row]] = torch.tensor(plan.encoded[i][0])
                valid[row, : lengths[row]] = True
            input_ids, valid = _to_device(input_ids, device), _to_device(valid, device)
            ctx = BatchContext(input_ids=input_ids, valid=valid, w_o_factor=factor, n_heads=model.n_heads,
                               top_k=plan.top_k, lengths=lengths)
            collector = BatchCollector(plan.probes, ctx, buffers.writer(batch), model.n_layers, skip=skip)
            run_batch(plan.backend, model, input_ids, valid.long(), collector.sites, collector, remote=plan.remote)
            collector.flush()  # copies to the host queued behind this batch's kernels
            if storing is None:
                finish_batch(collector, batch, lengths)
                continue
            if stored is not None:
                stored.result()  # raises what storing the batch before raised
            stored = storing.submit(finish_batch, collector, batch, lengths)
        if stored is not None:
            stored.result()
    finally:
        if storing is not None:
            storing.shutdown(wait=True)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To a GPU through pinned memory without waiting: a copy from pageable memory would block the host
    until the GPU has finished the batch before, instead of letting it queue this one meanwhile."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def run_attrs(plan: CapturePlan) -> dict:
    model = plan.model
    return dict(
        workbench_schema=SCHEMA_VERSION,
        model=model.name,
        model_source=model.source,
        model_file_hash=model.file_hash,
        architecture=model.architecture,
        n_layers=model.n_layers,
        d_model=model.d_model,
        n_heads=model.n_heads,
        n_kv_heads=model.n_kv_heads,
        dtype=str(model.dtype).removeprefix("torch."),
        device="NDIF (nnsight remote execution)" if plan.remote is True else str(model.device),
        attn_implementation=model.attn_implementation,
        backend=plan.backend,
        weight_processing="none (raw Hugging Face weights)",
        probes=",".join(p.name for p in plan.probes),
        top_k=plan.top_k,
        add_special_tokens=int(plan.add_special_tokens),
        truncated_samples=",".join(map(str, plan.truncated)),
        residual_dtype=plan.residual_dtype,
        package_versions=json.dumps(package_versions()),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _check_texts(texts) -> list:
    """Texts as a list: strings, or (pre-tokenised input) lists of token ids; never a mix."""
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or isinstance(texts, (dict, bytes, bytearray)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a string or a list of strings (or of token-id lists), not {type(texts).__name__}.")
    texts = [t.tolist() if isinstance(t, (np.ndarray, torch.Tensor)) else list(t) if isinstance(t, tuple) else t
             for t in texts]
    if not texts:
        raise ValueError("No texts given: pass a string or a non-empty list of strings.")
    if all(isinstance(t, list) for t in texts):
        arrays = [np.asarray(t) if t and isinstance(t[0], (int, np.integer)) else None for t in texts]
        bad = [i for i, a in enumerate(arrays) if a is None or a.ndim != 1 or a.dtype.kind not in "iu"]
        if bad:
            raise TypeError(f"pre-tokenised input must be non-empty lists of token ids; item(s) {bad[:5]} are not.")
        return [a.astype(np.int64).tolist() for a in arrays]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings (or all token-id lists); item(s) {bad} are not.")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"text(s) {empty} are empty or whitespace only; remove them.")
    return texts


def token_strings(tokenizer, ids) -> dict[int, str]:
    """Each token id's decoded string (``tokenizer.decode([id])``), kept on the tokenizer: each
    vocabulary entry is decoded once per session, however many captures label their tokens with it."""
    cache = tokenizer.__dict__.setdefault("_workbench_token_strings", {})
    missing = sorted(set(ids) - cache.keys())
    if missing:
        cache.update(zip(missing, tokenizer.batch_decode([[t] for t in missing])))
    return cache


def _pretokenised(tokenizer, texts: list[list[int]]) -> tuple[list[str], list]:
    """Texts and spans for token-id input: each token's decoded string, concatenated; spans index into that text."""
    vocab = len(tokenizer)
    bad = [i for i, ids in enumerate(texts) if min(ids) < 0 or max(ids) >= vocab]
    if bad:
        raise ValueError(f"token ids out of range 0..{vocab - 1} in item(s) {bad[:5]}.")
    unique = sorted({t for ids in texts for t in ids})
    pieces = token_strings(tokenizer, unique)
    n_bytes = np.zeros(vocab, dtype=np.int64)
    n_bytes[unique] = [len(pieces[t].encode()) for t in unique]
    out_texts, encoded = [], []
    for ids in texts:
        ends = np.cumsum(n_bytes[ids])
        encoded.append((ids, np.stack([ends - n_bytes[ids], ends], axis=1)))
        out_texts.append("".join(map(pieces.__getitem__, ids)))
    return out_texts, encoded


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], np.ndarray]]:
    """Each text's token ids and the UTF-8 byte span (start, end) of each token, as an (n, 2) array
    (one batched tokenizer call)."""
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    out = []
    for text, ids, spans in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        if text.isascii():  # one byte per character
            offsets = spans
        else:  # UTF-8 length of each character from its code point, then character -> byte offset
            points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
            byte_at = np.zeros(len(text) + 1, dtype=np.int64)
            byte_at[1:] = np.cumsum(1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000))
            offsets = byte_at[spans]
        out.append((list(ids), offsets))
    return out


class RunBuffers:
    """A block of the run's arrays (all of it in memory, one block when streaming), filled batch by
    batch in place.

    Each batch writes its rows directly (one copy from the hook's tensor); padding
    positions are then overwritten with NaN (floats) or -1 (integers). Arrays start
    uninitialised: together the two cover every entry.
    """

    def __init__(self, plan: CapturePlan, n_samples: int):
        self.dims = plan.variable_dims
        sizes = plan.sizes(n_samples)
        self.n_samples = n_samples
        self.arrays: dict[str, np.ndarray] = {}
        if plan.shared_residual:
            # (sample, pos, layer + 1, d_model): entry l is resid_pre[l], entry l + 1 is resid_post[l]
            states = np.empty((n_samples, sizes["pos"], sizes["layer"] + 1, sizes["d_model"]),
                              dtype=plan.dtype("resid_pre"))
            self.arrays["resid_pre"], self.arrays["resid_post"] = states[:, :, :-1], states[:, :, 1:]
        for name, dims in self.dims.items():
            if name not in self.arrays:
                # Uninitialised on purpose: every batch writes its rows in full and mask_padding fills the rest of
                # each row (positions past its length), so a fill here would only cost one more pass over the memory.
                self.arrays[name] = np.empty([sizes[d] for d in dims], dtype=plan.dtype(name))
        self._faulting = None
        if plan.model.device.type == "cuda":
            # The first write to fresh memory costs a page fault per 4 KiB, paid by the thread that stores
            # each batch while the GPU would wait for its next one. Touch the memory now instead, on
            # torch's threads and off the GIL, while the first batch computes; the first store waits for it.
            bases = {id(a.base if a.base is not None else a): a.base if a.base is not None else a
                     for a in self.arrays.values()}
            self._faulting = threading.Thread(
                target=lambda: [torch.from_numpy(b).zero_() for b in bases.values()], daemon=True)
            self._faulting.start()

    def _wait_for_memory(self) -> None:
        if self._faulting is not None:
            self._faulting.join()
            self._faulting = None

    def writer(self, rows: list[int]):
        rows_index = np.asarray(rows)
        contiguous = bool(len(rows)) and (np.diff(rows_index) == 1).all()

        def store(name: str, layer: int | slice | None, value: np.ndarray) -> None:
            self._wait_for_memory()
            array = self.arrays[name]
            dims = self.dims[name]
            index: list = [rows_index]
            it = iter(value.shape[1:])
            for d in dims[1:]:
                if d == "layer":
                    index.append(layer)  # a layer, or slice(None): all layers, the value's axis in place
                    if isinstance(layer, slice):
                        next(it)
                else:
                    index.append(slice(0, next(it)))
            if contiguous:
                index[0] = slice(rows[0], rows[0] + len(rows))  # basic indexing: writes without a temporary copy
                # torch's copy runs on its threads and casts on the way (numpy's strided copy of a layer's residual
                # into the (sample, pos, layer, d_model) array runs on one)
                torch.from_numpy(array[tuple(index)]).copy_(torch.from_numpy(np.ascontiguousarray(value)))
                return
            if array.dtype == np.float16 and value.dtype != np.float16:  # torch casts 10x faster than numpy
                value = torch.from_numpy(np.ascontiguousarray(value)).to(torch.float16).numpy()
            array[tuple(index)] = value  # a compact dtype's overflow (inf) is reported by check_range

        return store

    def mask_padding(self, rows: list[int], lengths: list[int]) -> None:
        self._wait_for_memory()
        for row, n in zip(rows, lengths):
            for name, array in self.arrays.items():
                fill = -1 if np.issubdtype(array.dtype, np.integer) else np.nan
                dims = self.dims[name][1:]
                for axis, d in enumerate(dims):
                    if d in ("pos", "key_pos"):
                        index = [row] + [slice(None)] * len(dims)
                        index[axis + 1] = slice(n, None)
                        array[tuple(index)] = fill

    def check_range(self, residual_dtype: str) -> None:
        """With a compact dtype, a value beyond its range is stored as inf: refuse instead."""
        if residual_dtype == "float32":
            return
        for name, array in self.arrays.items():
            if array.dtype == RESIDUAL_DTYPES[residual_dtype] and np.isinf(array).any():
                raise OverflowError(
                    f"{name} has values beyond {residual_dtype}'s range (|x| > {np.finfo(array.dtype).max:.0f}); "
                    "capture with residual_dtype='float32'."
                )


def run_coords(plan: CapturePlan) -> dict:
    """The run's labels: texts, tokens, byte spans, validity, and the index coordinates."""
    model, texts, encoded, variable_dims, top_k = plan.model, plan.texts, plan.encoded, plan.variable_dims, plan.top_k
    n_samples = len(texts)
    width = plan.width

    token_id = np.full((n_samples, width), -1, dtype=np.int64)
    byte_start = np.zeros((n_samples, width), dtype=np.int64)
    byte_end = np.zeros((n_samples, width), dtype=np.int64)
    for i, (ids, offsets) in enumerate(encoded):
        token_id[i, : len(ids)] = ids
        byte_start[i, : len(ids)], byte_end[i, : len(ids)] = offsets[:, 0], offsets[:, 1]
    unique = np.unique(token_id[token_id >= 0])
    strings = token_strings(model.tokenizer, unique.tolist())
    table = np.array([strings[t] for t in unique.tolist()] + [""])  # padding (-1) looks up the last entry, ""
    token = table[np.where(token_id >= 0, np.searchsorted(unique, token_id), len(unique))]
    n_tokens = np.array([len(e[0]) for e in encoded], dtype=np.int64)
    coords = {
        "sample": np.arange(n_samples),
        "pos": np.arange(width),
        "text": ("sample", np.array(texts, dtype=str)),
        "n_tokens": ("sample", n_tokens),
        "token_id": (("sample", "pos"), token_id),
        "token": (("sample", "pos"), token),
        "byte_start": (("sample", "pos"), byte_start),
        "byte_end": (("sample", "pos"), byte_end),
        "valid": (("sample", "pos"), np.arange(width)[None, :] < n_tokens[:, None]),
    }
    dims_used = {d for dims in variable_dims.values() for d in dims}
    if "layer" in dims_used:
        coords["layer"] = np.arange(model.n_layers)
    if "head" in dims_used:
        coords["head"] = np.arange(model.n_heads)
    if "key_pos" in dims_used:
        coords["key_pos"] = np.arange(width)
    if "k" in dims_used:
        coords["k"] = np.arange(top_k)
    return coords
