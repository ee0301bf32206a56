"""The physical floor of a workload on this machine: the least time any engine could take.

Prefill is compute-bound: 2 FLOPs per weight per prompt token, plus causal attention, at the
rate of a large matmul measured here. A prompt's tokens that an earlier prompt of the workload
already began with are not counted (any engine with a prefix cache skips them: the shared-prefix
workload's 256-token instruction); its last token always is, since it yields the first output. Decode is bound by memory: every decode step reads all
the weights once, and each sequence reads its keys and values, at the copy bandwidth measured
here (or by compute where that is slower, as in float32). The floor is the sum of the two
phases; an engine's tokens/s over the floor's tokens/s says how much of the machine it uses.

W8A8 (`arithmetic` "int8": int8 projections, the LM head float; "int8+head": the head too) has
a floor of its own: its projections' FLOPs at the int8 GEMM rate measured here (the engine's
chosen kernel, engine.quant.w8a8, Triton's on CUDA, on a 2048 x 2048 x 2048 product, dynamic per-token
quantisation of the activations included: any W8A8 engine pays it) and one byte per weight.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels import cpu_features
from loadtest.workloads import Workload


@dataclass(frozen=True, slots=True)
class Machine:
    matmul_flops_per_s: float  # a large [2048 x 2048] @ [2048 x 2048] matmul in the dtype (or float32)
    copy_bytes_per_s: float  # read + write of a 1 GiB copy
    int8_ops_per_s: float | None = None  # the same product through the W8A8 int8 GEMM (CPU), if measured


@dataclass(frozen=True, slots=True)
class Floor:
    prefill_s: float
    decode_s: float

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


def measure_machine(dtype: torch.dtype, device: str = "cpu", int8: bool = False) -> Machine:
    a = torch.randn(2048, 2048, dtype=dtype, device=device)
    b = torch.randn(2048, 2048, dtype=dtype, device=device)
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_features.onednn_has_bf16():
        # AVX2 CPUs: PyTorch's bfloat16 matmul is a dot product per row there (this one took
        # minutes); any engine computes in float32 on bfloat16 weights instead, as ours does.
        a, b = a.float(), b.float()
    matmul_s = _best_of(lambda: a @ b, device)
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = _best_of(lambda: dst.copy_(src), device)
    int8_ops = 2 * 2048**3 / _int8_matmul_seconds(device) if int8 else None
    return Machine(2 * 2048**3 / matmul_s, 2 * src.numel() * src.element_size() / copy_s, int8_ops)


def _int8_matmul_seconds(device: str) -> float:
    from engine.quant import w8a8

    kernel = w8a8.choose_kernel(torch.device(device).type)  # fbgemm or oneDNN; Triton on CUDA
    w_q, w_scale = w8a8.quantize_weight(torch.randn(2048, 2048), w8a8.weight_max(kernel))
    packed = w8a8.prepare(kernel, w_q.to(device), w_scale.to(device))
    x = torch.randn(2048, 2048, device=device)
    return _best_of(lambda: w8a8.linear(kernel, packed, x, None), device)


def workload_floor(
    checkpoint: Path, workload: Workload, dtype: torch.dtype, machine: Machine, arithmetic: str = "float"
) -> Floor:
    """The floor of `workload` on a Llama-shaped checkpoint (sizes from its config.json), its
    linear layers computing in `arithmetic` ("float", "int8" or "int8+head": the module docstring)."""
    if arithmetic != "float" and machine.int8_ops_per_s is None:
        raise ValueError(f"an {arithmetic} floor needs the int8 rate: measure_machine(..., int8=True)")
    c = json.loads((Path(checkpoint) / "config.json").read_text())
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q_size, kv_size = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    layer_weights = hidden * (2 * q_size + 2 * kv_size) + 3 * hidden * c["intermediate_size"]
    linear_weights = layers * layer_weights  # the LM head is counted apart: it runs on sampled rows only
    item = torch.finfo(dtype).bits // 8
    kv_bytes_per_token = 2 * layers * kv_size * item

    cached = cached_prefix_lens(workload.prompts)
    prompt_tokens = workload.num_prompt_tokens - sum(cached)
    # a query at position i attends to i + 1 keys: the cached ones ask for none
    attention_flops = sum(
        4 * layers * q_size * (len(p) ** 2 - c**2) / 2 for p, c in zip(workload.prompts, cached, strict=True)
    )
    int8_rate = machine.int8_ops_per_s
    # (rate, bytes per weight) of the projections, then of the LM head
    linear_rate, linear_item = (int8_rate, 1) if arithmetic != "float" else (machine.matmul_flops_per_s, item)
    head_rate, head_item = (int8_rate, 1) if arithmetic == "int8+head" else (machine.matmul_flops_per_s, item)
    prefill_s = (
        2 * linear_weights * prompt_tokens / linear_rate
        + attention_flops / machine.matmul_flops_per_s
        + 2 * vocab * hidden * len(workload.prompts) / head_rate
    )

    decode_steps = max(workload.output_lens) - 1  # the first output token comes from the prefill
    weight_bytes = linear_weights * linear_item + vocab * hidden * head_item
    kv_read = sum(
        (len(p) + i) * kv_bytes_per_token
        for p, n in zip(workload.prompts, workload.output_lens, strict=True)
        for i in range(1, n)
    )
    decode_tokens = workload.num_output_tokens - len(workload.prompts)  # after each request's first
    decode_compute_s = 2 * decode_tokens * (linear_weights / linear_rate + vocab * hidden / head_rate)
    decode_s = max((decode_steps * weight_bytes + kv_read) / machine.copy_bytes_per_s, decode_compute_s)
    return Floor(prefill_s, decode_s)


def cached_prefix_lens(prompts: list[list[int]]) -> list[int]:
    """Per prompt, how many of its first tokens an earlier prompt also began with (at most all but
    its last): what a prefix cache of token granularity could skip, a bound on any engine's."""
    cached = []
    for i, prompt in enumerate(prompts):
        longest = 0
        for earlier in prompts[:i]:
            n = 0
            for a, b in zip(prompt, earlier, strict=False):  # prompts differ in length
                if a != b:
                    break
                n += 1
            longest = max(longest, n)
        cached.append(min(longest, len(prompt) - 1))
    return cached


def _best_of(fn, device: str, repeats: int = 5) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
