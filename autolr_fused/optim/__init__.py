"""The public optimizer classes, one file each."""

from autolr_fused.optim.aalr import AALR, AALRDecision
from autolr_fused.optim.autodrop import FusedAutoDropSGD
from autolr_fused.optim.rdbd import FusedRDBD
from autolr_fused.optim.sgd import FusedSGD
from autolr_fused.optim.sgdhd import FusedSGDHD
from autolr_fused.optim.sgdl import FusedSGDL
from autolr_fused.optim.tlr import FusedTLR

__all__ = ["AALR", "AALRDecision", "FusedAutoDropSGD", "FusedRDBD", "FusedSGD", "FusedSGDHD", "FusedSGDL", "FusedTLR"]
