"""Interpretability workbench: real model -> probes -> labelled xarray runs -> analyses -> plots -> widgets.

    import workbench as wb
    model = wb.load_model()                      # SmolLM2-135M, embedded, offline
    run = wb.capture(model, ["The cat sat on the mat."], probes=["resid_pre", "attn_received"])
    wb.save_run(run, "runs/cat.zarr")
"""

import importlib

# Names are imported on first use (PEP 562), so `workbench --help` and light imports do not load
# torch, transformers and xarray.
_LAZY = {
    "InputTooLongError": "capturing", "capture": "capturing",
    "ModelHandle": "models", "ModelNotAvailableError": "models", "list_models": "models", "load_model": "models",
    "load_tokenizer": "models",
    "DEFAULT_PROBES": "probes", "PROBES": "probes", "UnknownProbeError": "probes",
    "RunExistsError": "runs", "open_run": "runs", "save_run": "runs",
    "InvalidRunError": "schema", "validate_run": "schema",
    "figure_folder": "plots.export", "saved_study": "studies.registry",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("workbench")
    except PackageNotFoundError:  # run from a checkout without installing
        return "0+unknown"


__all__ = [
    "DEFAULT_PROBES",
    "PROBES",
    "InputTooLongError",
    "InvalidRunError",
    "ModelHandle",
    "ModelNotAvailableError",
    "RunExistsError",
    "UnknownProbeError",
    "capture",
    "figure_folder",
    "list_models",
    "load_model",
    "load_tokenizer",
    "saved_study",
    "open_run",
    "save_run",
    "validate_run",
    "version",
]
