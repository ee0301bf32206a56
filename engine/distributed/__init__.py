"""Tensor and pipeline parallelism: the rank layout and collectives (parallel_state), the
worker processes (worker) and the driver-side executor that starts and steers them (executor).

Kept import-free: the layers import parallel_state, and the executor imports the layers.
"""
