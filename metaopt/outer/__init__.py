"""Outer loops that improve meta-parameters, interchangeable over one inner loop.

>>> outer = metaopt.outer.make("es", inner, population_size=32)      # or "pes", "metagrad"
"""

from __future__ import annotations

from typing import Any

from metaopt.inner import InnerLoop
from metaopt.outer.base import OuterEstimator, sanitize_losses
from metaopt.outer.es import ES, ESState
from metaopt.outer.metagrad import MetaGradient, MetaGradState
from metaopt.outer.pes import PES, PESState

ESTIMATORS: dict[str, type] = {"es": ES, "pes": PES, "metagrad": MetaGradient}


def make(name: str, inner: InnerLoop, **kwargs: Any) -> OuterEstimator:
    """Builds the outer estimator ``name`` ("es", "pes" or "metagrad") over ``inner``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown outer estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](inner, **kwargs)


__all__ = [
    "ES",
    "ESTIMATORS",
    "ESState",
    "MetaGradState",
    "MetaGradient",
    "OuterEstimator",
    "PES",
    "PESState",
    "make",
    "sanitize_losses",
]
