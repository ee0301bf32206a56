"""PiecewiseGraphs: steps with prompt tokens replayed as CUDA graphs between attention calls
(vLLM v1's piecewise CUDA graphs, without torch.compile: the forward is split where it calls
attention, at run time).

A step that computes prompt chunks beside decodes cannot be captured whole: its attention reads
per-sequence lengths on the host (varlen attention's longest query and context, the split of its
rows), which change every step. Everything else in a dense model's forward (the embedding,
norms, projections, rotary, MLPs) works row by row and depends only on the number of tokens.
So for each padded token count of a ladder (16, 32, 64, ... up to 512) the forward is captured
as pieces: graph 0 runs from the embedding to the first layer's attention inputs, graph i from
layer i-1's attention output to layer i's attention inputs, the last one to the final hidden
states. A step of T tokens copies its inputs into static buffers, replays the pieces of the
smallest captured count >= T, and between two pieces runs that layer's attention eagerly on the
step's real metadata and its T real rows (the KV cache write included), writing the result into
the buffer the next piece reads. Padded rows go through the pieces, whose results for them are
dropped; they never reach attention or the KV cache.

Decode-only steps keep their full graphs (engine.executor.cuda_graphs): those capture attention
too. Steps of more tokens than the largest piece size run eagerly: there the arithmetic, not the
launches, decides. `use_graphs=False` runs the same split, padding and static buffers eagerly,
which is how the CPU tests check it; the capture itself needs CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.executor.cuda_graphs import copy_padded
from engine.forward_context import AttentionMetadata, attention_metadata, split_at_attention

log = logging.getLogger(__name__)

MAX_PIECEWISE_TOKENS = 512  # vLLM's default largest capture size too


def piecewise_sizes(max_num_batched_tokens: int) -> list[int]:
    """The token counts captured: powers of two from 16 up to 512 or the step budget, and the budget
    itself where it is smaller."""
    top = min(max_num_batched_tokens, MAX_PIECEWISE_TOKENS)
    sizes = [s for s in (16, 32, 64, 128, 256, 512) if s < top]
    return [*sizes, top]


@dataclass
class _Boundary:
    """One attention call between two pieces: its layer, its inputs (written by the piece before)
    and the buffer its output goes to (read by the piece after)."""

    layer: torch.nn.Module
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


@dataclass
class _Pieces:
    """The captured pieces of one token count: len(boundaries) + 1 graphs."""

    graphs: list = field(default_factory=list)
    boundaries: list[_Boundary] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # the last piece's output, [size, hidden]


class _Capture:
    """While the model's forward runs once under capture: ends the current graph at each attention
    call, leaves the call out (its output buffer is allocated outside the graphs) and begins the next."""

    def __init__(self, pieces: _Pieces, pool) -> None:
        self.pieces = pieces
        self.pool = pool
        self._begin()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.pieces.graphs.append(graph)

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pieces.graphs[-1].capture_end()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D], as the backends return
        self.pieces.boundaries.append(_Boundary(layer, q, k, v, out))
        self._begin()
        return out

    def end(self) -> None:
        self.pieces.graphs[-1].capture_end()


class _PaddedAttention:
    """Eager runs over padded buffers (warm-up, and use_graphs=False): each layer's attention on the
    real rows only, with the step's metadata; the padded rows' outputs are zeros."""

    def __init__(self, num_real: int, metadata: AttentionMetadata | None) -> None:
        self.num_real = num_real
        self.metadata = metadata  # None: warm-up, attention left out

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        if self.metadata is not None:
            n = self.num_real
            with split_at_attention(None), attention_metadata(self.metadata):
                out[:n] = layer(q[:n], k[:n], v[:n])
        return out


class PiecewiseGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        sizes: list[int],
        device: torch.device,
        use_graphs: bool = True,  # False: same split, buffers and padding, run eagerly (CPU tests)
    ) -> None:
        self.model = model
        self.sizes = sizes
        self.use_graphs = use_graphs
        self.input_ids = torch.zeros(sizes[-1], dtype=torch.int64, device=device)
        self.positions = torch.zeros(sizes[-1], dtype=torch.int64, device=device)
        self._pieces: dict[int, _Pieces] = {}

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size's pieces, largest first, all in one memory pool: a step replays one
        size's pieces at a time, so one size's intermediates may reuse another's."""
        if not self.use_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            self._eager(size, _PaddedAttention(size, None))  # warm-up: lazy initialisation, Triton compiles
            torch.cuda.synchronize()
            pieces = _Pieces()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                capture = _Capture(pieces, pool)
                with split_at_attention(capture):
                    pieces.hidden = self.model(self.input_ids[:size], self.positions[:size])
                capture.end()
            torch.cuda.current_stream().wait_stream(stream)
            self._pieces[size] = pieces
        torch.cuda.synchronize()
        num_graphs = sum(len(p.graphs) for p in self._pieces.values())
        log.info(
            "captured piecewise CUDA graphs for steps of up to %s tokens (%d graphs)",
            ", ".join(map(str, self.sizes)),
            num_graphs,
        )

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The step's final hidden states [T, hidden]: the pieces of the next size up, replayed,
        with each layer's attention run eagerly between them."""
        num_tokens = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= num_tokens)
        copy_padded(self.input_ids, input_ids, size)
        copy_padded(self.positions, positions, size)
        if not self.use_graphs:
            return self._eager(size, _PaddedAttention(num_tokens, metadata))[:num_tokens]
        pieces = self._pieces[size]
        with attention_metadata(metadata):
            for graph, boundary in zip(pieces.graphs, pieces.boundaries, strict=False):
                graph.replay()
                b = boundary
                b.out[:num_tokens].copy_(b.layer(b.q[:num_tokens], b.k[:num_tokens], b.v[:num_tokens]))
            pieces.graphs[-1].replay()
        return pieces.hidden[:num_tokens]

    def _eager(self, size: int, attention: _PaddedAttention) -> torch.Tensor:
        with split_at_attention(attention):
            return self.model(self.input_ids[:size], self.positions[:size])
