"""Parallelism's lowest floor: the rank layout (layout) and the collectives (parallel_state).

The layers import parallel_state for their shard and collectives; the processes that hold the
ranks (engine.executor) sit above the layers and models they build.
"""
