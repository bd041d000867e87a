"""Moved: partial forward passes are :mod:`ffkv.models.engine` (the one engine). This module only re-exports
the names that modules outside the engine's owner still import; delete it when they import the engine."""

from ..models.engine import Cost, check_tail, reference_run, run_tail

__all__ = ["Cost", "check_tail", "reference_run", "run_tail"]
