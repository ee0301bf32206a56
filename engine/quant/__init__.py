"""Model compression at load time, and the quantised layers' kernels.

Bitsandbytes int8/NF4/FP4, FP8 on CUDA, W8A8 int8 on CPU (also from compressed-tensors
checkpoints), 2:4 sparsity, FP8 KV cache.

Each linear layer delegates its matmul to a per-layer `quant_method` (engine.quant.base);
`engine.quant.plan` chooses and applies them around weight loading; `engine.quant.kv_cache`
holds the FP8 KV-cache helpers.
"""

from engine.quant.base import UNQUANTIZED, LinearMethod, UnquantizedLinearMethod
from engine.quant.plan import (
    NO_QUANTIZATION,
    QuantizationError,
    QuantPlan,
    make_plan,
    model_weight_bytes,
)

__all__ = [
    "NO_QUANTIZATION",
    "UNQUANTIZED",
    "LinearMethod",
    "QuantPlan",
    "QuantizationError",
    "UnquantizedLinearMethod",
    "make_plan",
    "model_weight_bytes",
]
