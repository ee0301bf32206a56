"""Mixture-of-experts: a router picks top-k experts per token; the experts' weights are stacked.

FusedMoE holds every expert of a layer in two stacked parameters (Transformers' in-memory
names and layout): gate_up_proj [E, 2 * I, H] (each expert's [gate; up] rows) and down_proj
[E, H, I], with optional biases gate_up_proj_bias [E, 2 * I] and down_proj_bias [E, H].

The fused computation groups tokens by expert instead of looping over tokens: the T * k
(token, expert) pairs are sorted by expert id, each expert's tokens form one contiguous slice,
one grouped matmul (torch._grouped_mm on CUDA where this PyTorch has it, else one matmul
per non-empty expert) runs each slice against its expert, and the weighted results are
scatter-added back to their tokens.
On CUDA, where triton imports, forward runs both projections in the grouped-GEMM Triton
kernel of engine.kernels.triton_moe instead (use_triton = False turns it off). With mxfp4=True
(GPT-OSS's checkpoints where that kernel runs: engine.models.gpt_oss) the weights stay packed
as `*_blocks` [E, out, in / 32, 16] and `*_scales` [E, out, in / 32] uint8 (4.25 bits a
weight), and forward always runs the kernel, which dequantises them tile by tile.

Tensor parallelism splits every expert's intermediate dim I across ranks (gate and up by
rows, down by columns, as MergedColumnParallelLinear and RowParallelLinear do): each rank's
output is a partial sum, all-reduced at the end. down_proj's bias is added by rank 0 only.

Expert parallelism (EngineConfig.expert_parallel) splits the experts instead: rank r of tp
holds experts [r * E / tp, (r + 1) * E / tp) whole. The activations are replicated on every
rank (attention ends in an all-reduce), so each rank routes all tokens, computes only the
(token, expert) pairs of its own experts (with their biases), and the same all-reduce sums the
ranks' contributions. This is vLLM's "naive" all-to-all for expert parallelism (its
NaiveAll2AllManager in vllm/distributed/device_communicators/all2all.py, and FusedMoE's
expert_map of global to local expert ids, -1 for another rank's, in
vllm/model_executor/layers/fused_moe/layer.py) with the dispatch step left out: our tokens are
on every rank already, so only the combine remains, and it is the tensor-parallel all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.kernels import triton_available
from engine.layers.linear import ReplicatedLinear, _check_divisible, _copy_shard
from engine.layers.tp import all_reduce, get_tp_rank, get_tp_size, is_expert_parallel
from engine.quant.mxfp4 import BLOCK as MXFP4_BLOCK
from engine.quant.mxfp4 import FP4_VALUES

_DOWN_WEIGHTS = ("down_proj", "down_proj_blocks", "down_proj_scales")  # [E, H, I, ...]: I split
# gate_up [N, 2 * I] = [gate | up] -> [N, I]
ExpertActivation = Callable[[torch.Tensor], torch.Tensor]


def select_experts(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool, softmax_after_top_k: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64).

    Softmax over all experts in float32, then the top k (renormalised to sum to 1 if asked:
    Mixtral, Qwen3-MoE's norm_topk_prob); or, softmax_after_top_k, the top k logits and a
    softmax over just them (GPT-OSS).
    """
    if softmax_after_top_k:
        values, ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.softmax(values.float(), dim=-1), ids
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The experts of one layer, stacked; forward(x, weights, ids) -> [T, H] (all-reduced)."""

    is_moe_experts = True  # engine.quant quantises these per expert (engine.quant.experts)

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: ExpertActivation,
        bias: bool = False,
        mxfp4: bool = False,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.is_expert_parallel = is_expert_parallel() and self.tp_size > 1
        self.num_experts = num_experts  # all ranks'
        self.intermediate_size = intermediate_size  # all ranks'
        if self.is_expert_parallel:  # whole experts [expert_start, expert_start + num_local_experts)
            _check_divisible(num_experts, self.tp_size, "expert_parallel: the number of experts")
            self.num_local_experts = num_experts // self.tp_size
            self.expert_start = self.tp_rank * self.num_local_experts
            self.intermediate_rank, self.intermediate_shards = 0, 1
        else:  # every expert, a slice of its intermediate dim
            _check_divisible(intermediate_size, self.tp_size, "the experts' intermediate size")
            self.num_local_experts, self.expert_start = num_experts, 0
            self.intermediate_rank, self.intermediate_shards = self.tp_rank, self.tp_size
        local, size = self.num_local_experts, intermediate_size // self.intermediate_shards  # this rank's
        self.activation = activation
        self.is_mxfp4 = mxfp4  # packed MXFP4 weights, run by the Triton kernel only
        if mxfp4:
            self._make_mxfp4_weights(local, size, hidden_size)
        else:
            self.gate_up_proj = _parameter(self, local, 2 * size, hidden_size)
            self.down_proj = _parameter(self, local, hidden_size, size)
        self.gate_up_proj_bias = _parameter(self, local, 2 * size) if bias else None
        self.down_proj_bias = _parameter(self, local, hidden_size) if bias else None
        # torch._grouped_mm: None uses it on CUDA only (on CPU, measured slower than one matmul
        # per expert: loadtest/RESULTS.md); False: one matmul per expert everywhere
        self.use_grouped_mm: bool | None = None
        # the grouped-GEMM Triton kernel (engine.kernels.triton_moe) for both projections: None
        # uses it on CUDA where triton imports; False: fused_experts everywhere
        self.use_triton: bool | None = None
        # engine.quant.experts: set when the experts are quantised (the stacked weights are then None)
        self.quant_method = None

    def _make_mxfp4_weights(self, local: int, size: int, hidden_size: int) -> None:
        # `*_blocks` [E, out, in / 32, 16] and `*_scales` [E, out, in / 32] uint8 (engine.quant.mxfp4)
        self.register_parameter("gate_up_proj", None)
        self.register_parameter("down_proj", None)
        for name, out, k in (("gate_up_proj", 2 * size, hidden_size), ("down_proj", hidden_size, size)):
            _check_divisible(k, MXFP4_BLOCK, f"MXFP4 {name}: this rank's input size")
            groups = k // MXFP4_BLOCK
            setattr(
                self, f"{name}_blocks", _parameter(self, local, out, groups, MXFP4_BLOCK // 2, packed=True)
            )
            setattr(self, f"{name}_scales", _parameter(self, local, out, groups, packed=True))
        values = torch.tensor(FP4_VALUES, dtype=torch.float32)
        self.register_buffer("mxfp4_values", values, persistent=False)  # the kernel's lookup table

    @property
    def adds_down_bias(self) -> bool:
        """down_proj's bias joins once per expert: on rank 0 when every rank holds every expert."""
        return self.is_expert_parallel or self.tp_rank == 0

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Shard ids: None, the stacked tensor [E, ...] in our layout; e (an expert), that
        expert's down_proj [H, I]; (e, 0) / (e, 1), its gate / up projection [I, H]. With expert
        parallelism another rank's expert is skipped (a lazy checkpoint slice stays unread)."""
        if shard_id is None and self.is_expert_parallel:  # this rank's experts, whole
            _copy_shard(param.data, loaded_weight, dim=0, index=self.tp_rank, num_shards=self.tp_size)
            return
        if shard_id is not None:
            expert = shard_id if isinstance(shard_id, int) else shard_id[0]
            _check_expert(expert, self.num_experts)
            local = expert - self.expert_start
            if not 0 <= local < self.num_local_experts:  # expert parallel: another rank's
                return
        rank, shards = self.intermediate_rank, self.intermediate_shards
        if param is self.down_proj_bias:  # replicated
            _copy_shard(param.data, loaded_weight, dim=0, index=0, num_shards=1)
        elif any(param is getattr(self, n, None) for n in _DOWN_WEIGHTS):  # input columns split
            target = param.data if shard_id is None else param.data[local]
            _copy_shard(target, loaded_weight, 2 if shard_id is None else 1, rank, shards)
        elif shard_id is None:  # stacked [E, 2I, ...] = [E, [gate; up], ...]: each half's rows split
            full = self.intermediate_size
            _check_shape(loaded_weight, (param.shape[0], 2 * full, *param.shape[2:]))
            for half in (0, 1):
                self._load_half(param.data, loaded_weight.narrow(1, half * full, full), half, dim=1)
        else:
            self._load_half(param.data[local], loaded_weight, shard_id[1], dim=0)

    def _load_half(self, target: torch.Tensor, loaded: torch.Tensor, half: int, dim: int) -> None:
        size = target.shape[dim] // 2
        shard = target.narrow(dim, half * size, size)
        _copy_shard(shard, loaded, dim, self.intermediate_rank, self.intermediate_shards)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        if self.is_mxfp4 or (self.use_triton is not False and x.is_cuda and triton_available()):
            from engine.kernels.triton_moe import triton_fused_experts

            out = triton_fused_experts(self, x, weights, ids)
        else:
            out = fused_experts(self, x, weights, ids)
        return all_reduce(out)


def fused_experts(
    experts: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """This rank's share of the experts' weighted sum, tokens grouped by expert (no all-reduce)."""
    num_tokens, top_k = ids.shape
    pairs, local_ids = _local_pairs(experts, ids)  # [P]: pair index t * k + j, its local expert id
    order = local_ids.argsort(stable=True)  # pairs sorted by expert; a token's pairs keep their order
    token_of = pairs[order] // top_k  # [P]: the token of each sorted pair
    sorted_ids = local_ids[order]
    counts = torch.bincount(local_ids, minlength=experts.num_local_experts)  # [E_local]
    hidden = x[token_of]  # [P, H], grouped by expert
    gate_up = _grouped_linear(experts, hidden, "gate_up_proj", counts)  # [P, 2 I]
    if experts.gate_up_proj_bias is not None:
        gate_up = gate_up + experts.gate_up_proj_bias[sorted_ids]
    down = _grouped_linear(experts, experts.activation(gate_up), "down_proj", counts)  # [P, H]
    if experts.down_proj_bias is not None and experts.adds_down_bias:
        down = down + experts.down_proj_bias[sorted_ids]
    down = down * weights.flatten()[pairs[order]].unsqueeze(1).to(down.dtype)
    out = torch.zeros(num_tokens, x.shape[1], dtype=x.dtype, device=x.device)
    return out.index_add_(0, token_of, down.to(x.dtype))


def _local_pairs(experts: FusedMoE, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (the (token, expert) pairs this rank computes [P], their local expert ids [P]):
    every pair, or with expert parallelism those routed to this rank's experts."""
    flat_ids = ids.flatten()  # [T * k]
    if not experts.is_expert_parallel:
        return torch.arange(flat_ids.numel(), device=ids.device), flat_ids
    local_ids = flat_ids - experts.expert_start
    pairs = ((local_ids >= 0) & (local_ids < experts.num_local_experts)).nonzero().squeeze(1)
    return pairs, local_ids[pairs]


def looped_experts(
    experts: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The same sum with a loop over experts, each gathering its tokens by mask (Transformers'
    eager way): the reference and the benchmark's baseline."""
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        local = expert - experts.expert_start
        if not 0 <= local < experts.num_local_experts:  # expert parallel: another rank's
            continue
        token, slot = torch.where(ids == expert)
        gate_up = x[token] @ experts.gate_up_proj[local].T
        if experts.gate_up_proj_bias is not None:
            gate_up = gate_up + experts.gate_up_proj_bias[local]
        down = experts.activation(gate_up) @ experts.down_proj[local].T
        if experts.down_proj_bias is not None and experts.adds_down_bias:
            down = down + experts.down_proj_bias[local]
        out.index_add_(0, token, down * weights[token, slot, None].to(down.dtype))
    return out


class SparseMoeBlock(nn.Module):
    """Router (`gate`: [E, H] logits, optional bias) and its experts: the MLP of an MoE layer."""

    def __init__(
        self,
        experts: FusedMoE,
        top_k: int,
        hidden_size: int,
        *,
        renormalize: bool,
        softmax_after_top_k: bool = False,
        router_bias: bool = False,
    ):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.softmax_after_top_k = softmax_after_top_k
        self.gate = ReplicatedLinear(hidden_size, experts.num_experts, router_bias)
        self.gate.is_router = True  # engine.quant keeps it float (as vLLM does): it picks the experts
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H]
        weights, ids = select_experts(
            self.gate(x),
            self.top_k,
            renormalize=self.renormalize,
            softmax_after_top_k=self.softmax_after_top_k,
        )
        return self.experts(x, weights, ids)


def _grouped_linear(experts: FusedMoE, hidden: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
    """hidden [N, in] grouped by expert (counts [E]) times each group's weight[e].T -> [N, out]."""
    if experts.quant_method is not None:
        return _quantized_grouped_linear(experts, hidden, name, counts)
    weight = getattr(experts, name)
    use_grouped_mm = hidden.is_cuda if experts.use_grouped_mm is None else experts.use_grouped_mm
    if use_grouped_mm and hasattr(torch, "_grouped_mm") and hidden.shape[0]:
        try:
            offsets = counts.cumsum(0).to(torch.int32)
            return torch._grouped_mm(hidden, weight.transpose(1, 2), offs=offsets)
        except RuntimeError:  # this device or dtype has no grouped kernel: per-expert matmuls
            experts.use_grouped_mm = False
    out = hidden.new_empty(hidden.shape[0], weight.shape[1])
    start = 0
    for expert, count in enumerate(counts.tolist()):  # one host sync per call
        if count:  # written in place: a row slice of `out` is contiguous
            torch.mm(hidden[start : start + count], weight[expert].T, out=out[start : start + count])
            start += count
    return out


def triton_kernel_runs_on(device: torch.device) -> bool:
    """Whether engine.kernels.triton_moe's kernel runs on `device`: CUDA where triton imports, or
    CPU under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported: tests)."""
    if device.type not in ("cuda", "cpu") or not triton_available():
        return False
    import triton

    return device.type == "cuda" or bool(triton.knobs.runtime.interpret)


def _quantized_grouped_linear(
    experts: FusedMoE, hidden: torch.Tensor, name: str, counts: torch.Tensor
) -> torch.Tensor:
    # each non-empty expert's slice through its own quantised projection (engine.quant.experts)
    method = experts.quant_method
    out = hidden.new_empty(hidden.shape[0], method.out_features(experts, name))
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            out[start : start + count] = method.apply(experts, name, expert, hidden[start : start + count])
            start += count
    return out


def _parameter(layer: FusedMoE, *shape: int, packed: bool = False) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=torch.uint8 if packed else None), requires_grad=False)
    param.weight_loader = layer.weight_loader
    return param


def _check_shape(loaded_weight, expected: tuple) -> None:
    if tuple(loaded_weight.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected {tuple(expected)}")


def _check_expert(expert: int, num_experts: int) -> None:
    if not 0 <= expert < num_experts:
        raise ValueError(f"is expert {expert}, but the model has {num_experts} experts")
