"""Per-step attention metadata, set by the model runner around each forward (nano-vllm's context).

Layers read it instead of receiving it through every forward(): the model's signature stays
`forward(input_ids, positions)` whatever the attention backend needs.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """The batch of one step: sequences laid end to end as T = sum(query_lens) tokens."""

    query_lens: list[int]  # new tokens of each sequence this step (host)
    context_lens: list[int]  # tokens in the cache after this step, new ones included (host)
    cu_query_lens: torch.Tensor  # [B + 1] int32, prefix sums of query_lens (device)
    cu_context_lens: torch.Tensor  # [B + 1] int32, prefix sums of context_lens (device)
    context_lens_tensor: torch.Tensor  # [B] int32 (device)
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (block * block_size + offset)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_context_len: int
    is_decode_only: bool  # every sequence has exactly one new token
    # decode-only steps: (row indices [b] on the device, their longest context), rows of similar length
    decode_groups: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    # what the SDPA backend derives from decode_groups for every layer alike, built by the step's
    # first layer and reused by the others (engine.layers.paged_kv.decode_group_inputs)
    decode_group_inputs: object | None = None
    # the step's tokens by LoRA adapter slot (engine.lora.LoRAMapping); None: no adapter this step
    lora: object | None = None


class _StepMetadata(threading.local):
    """Per thread: two engines stepping in one process (tests, a service beside a benchmark) each
    see their own step's metadata, never the other's."""

    current: AttentionMetadata | None = None
    # piecewise CUDA graphs (engine.executor.piecewise_graphs): what takes each attention call
    # while the forward is captured or run in pieces; None: attention runs as usual
    split: object | None = None


_step = _StepMetadata()


def group_by_length(context_lens: list[int], device, max_groups: int = 4, min_group: int = 8):
    """Split decode rows into up to `max_groups` groups of similar context length (sorted, equal counts)."""
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    num_groups = max(1, min(max_groups, len(order) // min_group))
    size = -(-len(order) // num_groups)
    groups = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        groups.append((torch.tensor(rows, dtype=torch.int64, device=device), context_lens[rows[-1]]))
    return groups


def get_attention_metadata() -> AttentionMetadata | None:
    """The running step's metadata; None outside a model-runner step (plain causal attention)."""
    return _step.current


@contextlib.contextmanager
def attention_metadata(metadata: AttentionMetadata | None):
    previous, _step.current = _step.current, metadata
    try:
        yield
    finally:
        _step.current = previous


def get_attention_split():
    """What takes the running forward's attention calls (`split.attend(layer, q, k, v)`), if any."""
    return _step.split


@contextlib.contextmanager
def split_at_attention(split):
    """Route every Attention call of the forward run inside to `split` (None: no split)."""
    previous, _step.split = _step.split, split
    try:
        yield
    finally:
        _step.split = previous
