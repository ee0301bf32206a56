"""SmoothQuant smoothing (Xiao et al., 2023) before W8A8: activation outliers moved into the weights.

Per-token int8 activations lose most where a few input channels are far larger than the rest
(LLMs have such channels): every other channel of that token gets few codes. Weights quantised
per output row mind large columns far less. So, for each norm that feeds linear layers, a scale
per input channel j

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(X: the norm's outputs over a calibration text; W: every linear layer it feeds, all their rows)
divides the norm's weight and multiplies those layers' columns. In float the model computes the
same function, (x / s) (W s)^T = x W^T; the activations have flatter channels and the weights
take on part of their range. alpha = 0.5 balances the two; llm-compressor's SmoothQuantModifier
uses the same mappings (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up) and
alpha 0.5 by default, and the written folder is an ordinary compressed-tensors W8A8 checkpoint
(smoothing leaves no trace in the format: it is in the weights).

Families: those whose decoder layer is `x + attn(input_layernorm(x))`, then `x + mlp(
post_attention_layernorm(x))`, each norm `weight * normalised(x)` (Llama, Mistral, Qwen2,
Qwen3, Phi-3 with its fused qkv/gate_up). Others (Gemma's 1 + weight norms and extra
feed-forward norms) are refused by name, as are mixtures of experts (the W8A8 writer's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SMOOTHABLE_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
)
# norm -> the projections it feeds (the fused names of Phi-3's checkpoints too)
MAPPINGS = {
    "input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj", "qkv_proj")),
    "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj", "gate_up_proj")),
}
DEFAULT_ALPHA = 0.5
_MIN_SCALE = 1e-5  # a channel never seen non-zero keeps a finite, positive scale


@dataclass(frozen=True)
class Smoothing:
    """Scales per (layer, norm), applied tensor by tensor as a checkpoint is rewritten."""

    scales: dict[str, torch.Tensor]  # "model.layers.{i}.{norm}" -> s [hidden] float32
    alpha: float

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor as smoothing changes it (float32), or unchanged if it is none of
        the smoothed norms' weights or the weights of the layers they feed."""
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[-1] != "weight":
            return tensor
        layer = ".".join(parts[:3])
        for norm, (block, projections) in MAPPINGS.items():
            s = self.scales.get(f"{layer}.{norm}")
            if s is None:
                continue
            if parts[3:] == [norm, "weight"]:
                return tensor.float() / s
            if parts[3] == block and parts[4] in projections and len(parts) == 6:
                return tensor.float() * s  # columns: W [N, K] * s [K]
        return tensor


def calibration_windows(text: str, tokenizer, num_samples: int, seq_len: int) -> list[list[int]]:
    """The text's tokens cut into up to `num_samples` windows of `seq_len` (the last may be
    shorter), each after the tokens the tokenizer starts a sequence with (BOS), as in serving."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise ValueError("the calibration text has no tokens")
    start = tokenizer("", add_special_tokens=True)["input_ids"]
    return [start + ids[i : i + seq_len] for i in range(0, len(ids), seq_len)][:num_samples]


@torch.no_grad()
def compute_smoothing(
    folder: str | Path,
    calibration_text: str,
    alpha: float = DEFAULT_ALPHA,
    num_samples: int = 64,
    seq_len: int = 512,
) -> Smoothing:
    """Run the float checkpoint at `folder` (Transformers, float32) over the calibration text and
    return the smoothing scales of every decoder layer's two norms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    architecture = type(model).__name__
    if architecture not in SMOOTHABLE_ARCHITECTURES:
        raise ValueError(
            f"{folder}: SmoothQuant smoothing is written for {', '.join(SMOOTHABLE_ARCHITECTURES)} "
            f"(norms of weight * x feeding q/k/v and gate/up), not {architecture}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    activation_max: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for norm in MAPPINGS:
            key = f"model.layers.{i}.{norm}"
            hooks.append(getattr(layer, norm).register_forward_hook(_recorder(activation_max, key)))
    try:
        for window in calibration_windows(calibration_text, tokenizer, num_samples, seq_len):
            model(torch.tensor([window]))
    finally:
        for hook in hooks:
            hook.remove()
    scales = {}
    for i, layer in enumerate(model.model.layers):
        for norm, (block, projections) in MAPPINGS.items():
            owner = getattr(layer, block)
            fed = [getattr(owner, p) for p in projections if hasattr(owner, p)]
            weight_max = torch.stack([m.weight.abs().amax(dim=0) for m in fed]).amax(dim=0)
            key = f"model.layers.{i}.{norm}"
            scales[key] = smoothing_scale(activation_max[key], weight_max, alpha)
    return Smoothing(scales, alpha)


def smoothing_scale(activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha), per input channel, float32."""
    s = activation_max.float().pow(alpha) / weight_max.float().clamp(min=_MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=_MIN_SCALE)


def _recorder(store: dict[str, torch.Tensor], key: str):
    def record(module, inputs, output):
        channel_max = output.detach().abs().reshape(-1, output.shape[-1]).amax(dim=0).float()
        store[key] = channel_max if key not in store else torch.maximum(store[key], channel_max)

    return record
