"""SamplingBatch: one step's SamplingParams as per-row device tensors plus host flags.

Built once per step with a few small host-to-device copies and no sync; the flags let the
Sampler skip whatever no row asks for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from engine.core.structured_output import GrammarMasks
from engine.sampling_params import SamplingParams

# SamplingParams fields copied as they are into SamplingBatch's float32 rows
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass(slots=True)
class SamplingBatch:
    """One step's sampling parameters, row i for the i-th sequence that samples this step.

    Tensors live on the device; the plain fields are host flags computed from the params so
    that `Sampler` can skip unused work without reading a tensor back.
    """

    temperature: torch.Tensor  # [N] float32; 0 = greedy
    top_k: torch.Tensor  # [N] int64; V where off
    top_p: torch.Tensor  # [N] float32; 1 = off
    min_p: torch.Tensor  # [N] float32; 0 = off
    repetition_penalty: torch.Tensor  # [N] float32; 1 = off
    presence_penalty: torch.Tensor  # [N] float32
    frequency_penalty: torch.Tensor  # [N] float32
    seeds: torch.Tensor  # [N] int64, the seed wrapped to 64 bits; 0 where unseeded
    output_lens: torch.Tensor  # [N] int64: tokens generated so far = index of this token
    seeded_rows: torch.Tensor  # [S] int64: sampled (non-greedy) rows that have a seed
    top_p_rows: torch.Tensor  # [R] int64: sampled rows with top_p < 1
    seen_mask: torch.Tensor | None  # [N, V] bool: in prompt or output; repetition rows only
    grammar_masks: GrammarMasks | None  # the allowed tokens of the rows under a grammar (structured output)
    output_counts: torch.Tensor | None  # [N, V] float32: output token counts; presence/freq rows
    # logit_bias and min_tokens' held-back stop tokens, sparse over the flattened [N, V] logits:
    # (flat index row * V + token [B] int64, value to add [B] float32, -inf for a held-back token)
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None
    all_greedy: bool
    any_greedy: bool
    any_unseeded: bool  # some sampled row draws from the engine-wide generator
    max_top_k: int  # largest top_k of a sampled row; 0: none uses top-k
    any_min_p: bool  # some sampled row uses min-p
    max_num_logprobs: int  # -1: no row wants logprobs

    @classmethod
    def build(
        cls,
        params_list: Sequence[SamplingParams],
        prompt_token_ids_list: Sequence[Sequence[int]],
        output_token_ids_list: Sequence[Sequence[int]],
        device: torch.device | str,
        vocab_size: int,
        grammar_masks: GrammarMasks | None = None,
        output_lens: Sequence[int] | None = None,
    ) -> SamplingBatch:
        """Per-row tensors for one step; a few small host-to-device copies, no sync.

        grammar_masks: the step's grammar masks on the host (engine.core.structured_output), if any.
        output_lens: tokens each row has generated, where the token lists are given only for rows
        with penalties (StepPlan's); by default the output lists' lengths.
        """
        device = torch.device(device)
        ps = params_list
        if output_lens is None:
            output_lens = [len(ids) for ids in output_token_ids_list]
        # the cuts and the noise matter only for sampled rows: greedy ones take the argmax
        sampled = [i for i, p in enumerate(ps) if not p.is_greedy]
        seeded = [i for i in sampled if ps[i].seed is not None]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in ps]
        return cls(
            **_param_tensors(ps, top_ks, output_lens, device),
            seeded_rows=_to_device(seeded, torch.int64, device),
            top_p_rows=_to_device([i for i in sampled if ps[i].top_p < 1.0], torch.int64, device),
            **_penalty_tensors(ps, prompt_token_ids_list, output_token_ids_list, device, vocab_size),
            grammar_masks=_masks_to_device(grammar_masks, device),
            logit_bias=_logit_bias(ps, output_lens, device, vocab_size),
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(ps),
            any_unseeded=len(seeded) < len(sampled),
            max_top_k=max((top_ks[i] for i in sampled if top_ks[i] < vocab_size), default=0),
            any_min_p=any(ps[i].min_p > 0.0 for i in sampled),
            max_num_logprobs=max((p.logprobs for p in ps if p.logprobs is not None), default=-1),
        )

    def with_grammar_masks(self, grammar_masks: GrammarMasks | None, device: torch.device) -> SamplingBatch:
        """The same rows under another step's grammar masks (a copy: the masks are per step)."""
        return dataclasses.replace(self, grammar_masks=_masks_to_device(grammar_masks, device))


def _param_tensors(
    ps: Sequence[SamplingParams], top_ks: list[int], output_lens: Sequence[int], device: torch.device
) -> dict[str, torch.Tensor]:
    # one host-to-device copy per dtype rather than one per field; each field is a [N] row
    floats = _to_device([[getattr(p, name) for p in ps] for name in _FLOAT_FIELDS], torch.float32, device)
    seeds = [_wrap_int64(p.seed) if p.seed is not None else 0 for p in ps]
    ints = _to_device([top_ks, seeds, list(output_lens)], torch.int64, device)
    int_fields = ("top_k", "seeds", "output_lens")
    return dict(zip(_FLOAT_FIELDS, floats, strict=True)) | dict(zip(int_fields, ints, strict=True))


def _penalty_tensors(
    ps: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    device: torch.device,
    vocab_size: int,
) -> dict[str, torch.Tensor | None]:
    # only rows with a penalty contribute token ids: the others cost nothing to build
    n = len(ps)
    rep_rows = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]
    count_rows = [i for i, p in enumerate(ps) if p.presence_penalty or p.frequency_penalty]
    seen_mask = output_counts = None
    if rep_rows:
        seen_mask = torch.zeros(n * vocab_size, dtype=torch.bool, device=device)
        for token_lists in (prompts, outputs):
            seen_mask.index_fill_(0, _flat_token_index(rep_rows, token_lists, vocab_size, device), True)
        seen_mask = seen_mask.view(n, vocab_size)
    if count_rows:
        flat = _flat_token_index(count_rows, outputs, vocab_size, device)
        output_counts = torch.zeros(n * vocab_size, device=device)
        output_counts.index_add_(0, flat, torch.ones(flat.shape, device=device))
        output_counts = output_counts.view(n, vocab_size)
    return {"seen_mask": seen_mask, "output_counts": output_counts}


def _logit_bias(
    ps: Sequence[SamplingParams], output_lens: Sequence[int], device: torch.device, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    index: list[int] = []
    values: list[float] = []
    for row, p in enumerate(ps):
        if p.logit_bias:
            index += [row * vocab_size + t for t in p.logit_bias]
            values += p.logit_bias.values()
        if p.min_tokens_stop_ids and output_lens[row] < p.min_tokens:
            index += [row * vocab_size + t for t in p.min_tokens_stop_ids]
            values += [float("-inf")] * len(p.min_tokens_stop_ids)
    if not index:
        return None
    return _to_device(index, torch.int64, device), _to_device(values, torch.float32, device)


def _flat_token_index(
    rows: list[int], token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    # [T] int64: row * V + token id for every token of the given rows, in a flattened [N, V]
    lists = [token_lists[i] for i in rows]
    lengths = [len(ids) for ids in lists]
    ids = _to_device(list(chain.from_iterable(lists)), torch.int64, device)
    # output_size spares repeat_interleave a sync to size its result
    repeats = _to_device(lengths, torch.int64, device)
    row_ids = _to_device(rows, torch.int64, device).repeat_interleave(repeats, output_size=sum(lengths))
    return row_ids * vocab_size + ids


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _host_to_device(torch.tensor(data, dtype=dtype), device)


def _masks_to_device(masks: GrammarMasks | None, device: torch.device) -> GrammarMasks | None:
    if masks is None:
        return None
    return GrammarMasks(_host_to_device(masks.rows, device), _host_to_device(masks.bitmask, device))


def _host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # pinned staging makes the copy asynchronous on CUDA
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _wrap_int64(seed: int) -> int:
    # any Python int -> its two's-complement int64 (seeds mod 2^64)
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed
