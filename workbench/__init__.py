"""Interpretability workbench: real model -> probes -> labelled xarray runs -> analyses -> plots -> widgets.

    import workbench as wb
    model = wb.load_model()                      # SmolLM2-135M, embedded, offline
    run = wb.capture(model, ["The cat sat on the mat."], probes=["resid_pre", "attn_received"])
    wb.save_run(run, "runs/cat.zarr")
"""

from .capture import InputTooLongError, capture
from .models import ModelHandle, ModelNotAvailableError, list_models, load_model, load_tokenizer
from .probes import DEFAULT_PROBES, PROBES, UnknownProbeError
from .runs import RunExistsError, open_run, save_run
from .schema import InvalidRunError, validate_run

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
    "list_models",
    "load_model",
    "load_tokenizer",
    "open_run",
    "save_run",
    "validate_run",
]
