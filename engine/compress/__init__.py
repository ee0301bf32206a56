"""Offline model compression tools: checkpoints in, smaller checkpoints out.

`python -m engine.compress` prunes a checkpoint 2:4; `python -m engine.compress w8a8 SRC DST`
writes a compressed-tensors W8A8 int8 checkpoint."""

from engine.compress.prune24 import PRUNABLE_PROJECTIONS, prune_2_4, prune_checkpoint
from engine.compress.w8a8 import compress_w8a8

__all__ = ["PRUNABLE_PROJECTIONS", "compress_w8a8", "prune_2_4", "prune_checkpoint"]
