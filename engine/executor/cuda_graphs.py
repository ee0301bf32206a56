"""DecodeGraphs: decode steps replayed as CUDA graphs (nano-vllm's capture_cudagraph).

A decode step computes one token per sequence, so for all but the largest batches it is
bound by kernel launches, not by the GPU: hundreds of small kernels, each launched from
Python. Captured once per batch size of a ladder (1, 2, 4, 8, 16, 32, ...), the whole forward
is replayed with one launch. The graphs read their inputs from static buffers; a step of B
sequences replays the smallest captured size >= B with the extra rows padded: they write
their keys and values to a scratch slot outside the block pool and attend to nothing.

Only attention backends that do no host work per decode step can be captured: flash
(flash-attn's kvcache kernel) and triton (ours). Steps with prompt tokens run eagerly.
"""

from __future__ import annotations

import logging

import torch

from engine.forward_context import AttentionMetadata, attention_metadata

log = logging.getLogger(__name__)


def can_capture(device: torch.device, attention_backend: str, quantization: str, world_size: int) -> bool:
    """Whether decode steps of this engine run as CUDA graphs (unless enforce_eager)."""
    # bitsandbytes' kernels are not known to be capturable (LLM.int8 picks outlier columns from
    # the data), so quantised bitsandbytes models decode eagerly; worker ranks decode eagerly
    # too: graphs are rank 0's only.
    return (
        device.type == "cuda"
        and attention_backend in ("flash", "triton")
        and quantization in ("none", "fp8")
        and world_size == 1
    )


def use_decode_graphs(runner, config, attention_backend: str, max_model_len: int) -> None:
    """Capture rank 0's decode steps as CUDA graphs where they can run, unless enforce_eager; with
    piecewise_cuda_graphs also its steps with prompt tokens, in pieces (engine.executor.piecewise_graphs)."""
    device = torch.device(config.device)
    if (
        not config.enforce_eager
        and not config.lora_adapters  # the LoRA segments change shape every step
        and can_capture(device, attention_backend, config.quantization, config.world_size)
        and is_capturable(runner.model)
    ):
        runner.enable_decode_graphs(max_model_len)
        if config.piecewise_cuda_graphs:
            runner.enable_piecewise_graphs()


def is_capturable(model: torch.nn.Module) -> bool:
    """Whether the model's decode step can be replayed as a graph: not with mixture-of-experts
    layers, whose per-expert matmuls read the token counts on the host (engine.layers.moe)."""
    return not any(getattr(module, "is_moe_experts", False) for module in model.modules())


def copy_padded(buffer: torch.Tensor, values: torch.Tensor, size: int, pad: int = 0) -> None:
    """A graph's static input: `values` in its first rows, `pad` in the rest up to `size` (the rows
    a captured size has beyond the step's)."""
    n = values.shape[0]
    buffer[:n].copy_(values)
    buffer[n:size].fill_(pad)


def capture_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        device: torch.device,
        use_graphs: bool = True,  # False: same buffers and padding, run eagerly (CPU tests)
    ) -> None:
        self.model = model
        self.sizes = capture_sizes(max_batch_size)
        self.scratch_slot = scratch_slot
        self.use_graphs = use_graphs
        max_bs = self.sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), scratch_slot, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden: torch.Tensor | None = None  # the forward's output, allocated by the first run
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def fits(self, metadata: AttentionMetadata) -> bool:
        return metadata.is_decode_only and len(metadata.query_lens) <= self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first so the smaller ones reuse its memory pool."""
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: lazy initialisation and Triton compilation stay out of the graph
            if not self.use_graphs:
                continue
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        if self.use_graphs:
            torch.cuda.synchronize()
            log.info(
                "captured CUDA graphs for decode batches of %s sequences", ", ".join(map(str, self.sizes))
            )

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The decode step's hidden states [B, hidden], by replaying the graph of the next size up."""
        batch = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        copy_padded(self.input_ids, input_ids, size)
        copy_padded(self.positions, positions, size)
        copy_padded(self.slot_mapping, metadata.slot_mapping, size, pad=self.scratch_slot)
        copy_padded(self.context_lens, metadata.context_lens_tensor, size)
        width = metadata.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(metadata.block_tables)
        if self.use_graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.hidden[:batch]

    def _forward(self, size: int) -> None:
        metadata = AttentionMetadata(
            query_lens=[1] * size,
            context_lens=[1] * size,  # host copies are not read by the capturable backends
            cu_query_lens=torch.arange(size + 1, dtype=torch.int32, device=self.input_ids.device),
            cu_context_lens=torch.zeros(size + 1, dtype=torch.int32, device=self.input_ids.device),
            context_lens_tensor=self.context_lens[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_context_len=self.block_tables.shape[1],
            is_decode_only=True,
        )
        with attention_metadata(metadata):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
        if self.hidden is None:
            self.hidden = torch.empty(
                self.sizes[-1], *hidden.shape[1:], dtype=hidden.dtype, device=hidden.device
            )
        self.hidden[:size].copy_(hidden)
