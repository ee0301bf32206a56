"""FP8 (e4m3) weights with per-output-channel scales; activations quantised per token at run time.

y = (x_q * s_x) (W_q * s_w)^T through torch._scaled_mm with row-wise scales: one scale per
token (computed from the token's absolute maximum each call) and one per output channel
(computed once at load). Needs CUDA compute capability 8.9 or newer (Ada, Hopper); anywhere
else `check_fp8_supported` stops start-up: there is no silent fallback to another mode.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quant.base import LinearMethod, _tensor_bytes

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
MIN_CAPABILITY = (8, 9)
_MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite scale


def check_fp8_supported(device: torch.device) -> None:
    """Raise ValueError unless fp8 matmuls (torch._scaled_mm) run on `device`."""
    if device.type != "cuda":
        raise ValueError(
            f"quantization 'fp8' needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); "
            f"device is {device.type!r}. Use int8, nf4 or fp4 on this device."
        )
    if not torch.cuda.is_available():
        raise ValueError("quantization 'fp8' needs CUDA, which this torch build or machine lacks")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f"quantization 'fp8' needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} "
            f"has {capability[0]}.{capability[1]}. Use int8, nf4 or fp4 on this GPU."
        )
    if not hasattr(torch, "_scaled_mm"):
        raise ValueError(f"quantization 'fp8' needs torch._scaled_mm, missing from torch {torch.__version__}")


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (x_q [R, C] e4m3, scale [R, 1] float32) with x ~= x_q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE)
    scale = amax / FP8_MAX
    x_q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q, scale


class Fp8LinearMethod(LinearMethod):
    name = "fp8"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        out_features, in_features = layer.weight.shape
        if out_features % 16 or in_features % 16:  # torch._scaled_mm's CUDA kernels tile by 16
            raise ValueError(
                f"fp8 needs linear layers whose sizes are multiples of 16, got [{out_features}, {in_features}]; "
                "keep this layer float with quantization_skip_modules"
            )
        weight_q, scale = quantize_per_row(layer.weight.data)  # [N, K], [N, 1]
        del layer.weight
        layer.register_parameter("weight", None)
        layer.weight_fp8 = nn.Parameter(weight_q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, N]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, K] -> [T, N]; _scaled_mm wants B column-major, which W_q^T of a row-major W_q is.
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_q, x_scale = quantize_per_row(x2)  # dynamic, per token
        y = torch._scaled_mm(
            x_q,
            layer.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=layer.weight_scale,
            out_dtype=torch.bfloat16,  # row-wise scaling produces bfloat16 only
        ).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def weight_bytes(self, layer: nn.Module) -> int:
        return _tensor_bytes(layer.weight_fp8, layer.weight_scale)
