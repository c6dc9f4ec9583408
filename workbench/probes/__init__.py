"""Probes: where things live inside a model (the site map), the one way to hook them, and what a capture stores."""

from .backends import BACKENDS, check_backend, run_batch
from .catalog import (
    DEFAULT_PROBES,
    PROBES,
    BatchContext,
    Probe,
    UnknownProbeError,
    check_probes_supported,
    resolve_probes,
    unsupported_probes,
)
from .collector import BatchCollector, w_o_factor_getter
from .sites import SITES, SiteMap, UnsupportedArchitectureError, UnsupportedSiteError

__all__ = [
    "BACKENDS",
    "DEFAULT_PROBES",
    "PROBES",
    "SITES",
    "BatchCollector",
    "BatchContext",
    "Probe",
    "SiteMap",
    "UnknownProbeError",
    "UnsupportedArchitectureError",
    "UnsupportedSiteError",
    "check_backend",
    "check_probes_supported",
    "resolve_probes",
    "run_batch",
    "unsupported_probes",
    "w_o_factor_getter",
]
