"""pmixed: certified PMixED private next-token prediction.

The mechanism of Flemings, Razaviyayn & Annavaram, "Differentially Private Next-Token Prediction of
Large Language Models" (NAACL 2024, arXiv 2403.15638), with accounting that is certified by default
(see PMIXED_MATH.md) and a paper-compatible reference mode marked UNCERTIFIED.
"""

from pmixed.divergence import renyi_divergence, renyi_divergence_log, symmetric_renyi_divergence
from pmixed.mechanism import (
    NeighbourDivergence,
    StepResult,
    exact_released_law,
    exact_released_log_law,
    neighbour_divergence,
    sample_subset,
    step,
)
from pmixed.modes import Mode, get_mode, mode_names, register_mode
from pmixed.mollifier import mollify, mollify_log
from pmixed.privacy import Calibration, FixedBetaMode, InfeasibleBudget, PMixEDConfig
from pmixed.standard_modes import CappedMode, CertifiedMode, ReferenceMode  # registers the three

__all__ = [
    "Calibration",
    "CappedMode",
    "CertifiedMode",
    "EnsembleLM",
    "FixedBetaMode",
    "InfeasibleBudget",
    "Mode",
    "NeighbourDivergence",
    "PMixEDConfig",
    "PrivateGenerator",
    "ReferenceMode",
    "StepResult",
    "exact_released_law",
    "exact_released_log_law",
    "get_mode",
    "mode_names",
    "mollify",
    "mollify_log",
    "neighbour_divergence",
    "register_mode",
    "renyi_divergence",
    "renyi_divergence_log",
    "sample_subset",
    "step",
    "symmetric_renyi_divergence",
]

__version__ = "0.1.0"

#: Names that need torch/transformers/peft, imported on first use so `import pmixed` stays light.
_LAZY = {"PrivateGenerator": "pmixed.generator", "EnsembleLM": "pmixed.models"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pmixed' has no attribute {name!r}")
