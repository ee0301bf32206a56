"""Per-step attention metadata, set by the model runner around each forward (nano-vllm's context).

Layers read it instead of receiving it through every forward(): the model's signature stays
`forward(input_ids, positions)` whatever the attention backend needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


_current: AttentionMetadata | None = None


def get_attention_metadata() -> AttentionMetadata | None:
    """The running step's metadata; None outside a model-runner step (plain causal attention)."""
    return _current


@contextlib.contextmanager
def attention_metadata(metadata: AttentionMetadata | None):
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous
