"""Oracles for tests and baselines for benchmarks."""

from .reference import ReferenceEngram

__all__ = ["ReferenceEngram"]
