"""The kernels and their loaders, each tested against a float64 reference.

The C++ CPU kernels (csrc/, x86), the Triton kernels, the compiled paged decode, and the CPU
features that choose among them.
"""


def triton_available() -> bool:
    """Whether Triton imports here (its kernels: MoE experts, LoRA segments)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
