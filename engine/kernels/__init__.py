"""The kernels and their loaders, each tested against a float64 reference.

The C++ CPU kernels (csrc/, x86), the Triton kernels, the compiled paged decode, and the CPU
features that choose among them.
"""
