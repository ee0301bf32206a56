"""Offline model compression tools. `python -m engine.compress` prunes a checkpoint 2:4."""

from engine.compress.prune24 import PRUNABLE_PROJECTIONS, prune_2_4, prune_checkpoint

__all__ = ["PRUNABLE_PROJECTIONS", "prune_2_4", "prune_checkpoint"]
