"""autolr_fused: automatic learning rates as drop-in replacements for torch.optim.SGD.

Public API: the optimizers :class:`FusedSGD`, :class:`FusedSGDL`,
:class:`FusedAutoDropSGD`, :class:`FusedTLR`, :class:`FusedRDBD`,
:class:`FusedSGDHD`, the epoch-level controller :class:`AALR`, the logging
helper :class:`StatsLogger`, and :func:`available_backends`.
"""

from autolr_fused._validation import ArgumentTypeError
from autolr_fused.backends import ENV_VAR as BACKEND_ENV_VAR
from autolr_fused.backends import BackendUnavailableError, available_backends
from autolr_fused.optim import (
    AALR,
    AALRDecision,
    FusedAutoDropSGD,
    FusedRDBD,
    FusedSGD,
    FusedSGDHD,
    FusedSGDL,
    FusedTLR,
)
from autolr_fused.telemetry import StatsLogger

__version__ = "0.1.0"

__all__ = [
    "AALR",
    "AALRDecision",
    "ArgumentTypeError",
    "BACKEND_ENV_VAR",
    "BackendUnavailableError",
    "FusedAutoDropSGD",
    "FusedRDBD",
    "FusedSGD",
    "FusedSGDHD",
    "FusedSGDL",
    "FusedTLR",
    "StatsLogger",
    "available_backends",
    "__version__",
]
