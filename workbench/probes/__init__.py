"""Probes: which tensors a capture reads from a model, and how it reduces them."""

from .backends import BACKENDS, UnsupportedModelError, run_batch
from .catalog import DEFAULT_PROBES, PROBES, BatchContext, Probe, UnknownProbeError, resolve_probes
from .collector import BatchCollector, w_o_gram_getter

__all__ = [
    "BACKENDS",
    "DEFAULT_PROBES",
    "PROBES",
    "BatchCollector",
    "BatchContext",
    "Probe",
    "UnknownProbeError",
    "UnsupportedModelError",
    "resolve_probes",
    "run_batch",
    "w_o_gram_getter",
]
