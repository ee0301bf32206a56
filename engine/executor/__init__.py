"""Running a step on devices: the executor, its worker processes, the model runner and the sampler.

Also CUDA graphs and the runtime every rank derives from the config alone (dtype, attention
backend, block size). `python -m engine.executor` runs one rank of a multi-node engine.
"""
