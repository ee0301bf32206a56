"""ModelRunner: the only orchestration code that touches the device.

It owns the model, the paged KV cache and the sampler. Each step it turns a SchedulerOutput
into flat input tensors (the batch's new tokens laid end to end), runs the model with the
step's attention metadata, computes logits only for sequences that sample, and samples.
"""

from __future__ import annotations

import logging

import torch

from engine.choice_scoring import scoring_rows
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.forward_context import AttentionMetadata, attention_metadata, group_by_length
from engine.layers.attention import Attention
from engine.layers.attention_backends import make_backend
from engine.quant import kv_cache as fp8_kv
from engine.sampler import Sampler, SamplerOutput, SamplingBatch
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.structured_output import token_bitmask

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, backend: str, block_size: int) -> None:
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.kv_dtype = fp8_kv.kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.block_size = block_size
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        backend_impl = make_backend(backend)
        for layer in self.layers:
            layer.backend = backend_impl
        self.sampler = Sampler(generator=torch.Generator(device=self.device).manual_seed(config.seed))
        self.num_blocks = 0
        self.decode_graphs: DecodeGraphs | None = None

    @property
    def kv_bytes_per_block(self) -> int:
        layer = self.layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.kv_dtype.itemsize
        return per_token * self.block_size * len(self.layers)

    def allocate_kv_cache(self) -> int:
        """Size the block pool from the memory budget, allocate it, bind it to the layers."""
        num_blocks = self.config.num_kv_blocks or self._blocks_that_fit()
        if num_blocks < 1:
            raise RuntimeError(
                "no memory left for the KV cache: lower max_num_batched_tokens or raise the budget"
            )
        layer = self.layers[0]
        # One block more than the pool: the scratch block where padded CUDA-graph rows write.
        shape = (len(self.layers), 2, num_blocks + 1, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        if self.kv_dtype == fp8_kv.FP8_KV_DTYPE:
            vocab_size = self.model.config.vocab_size
            fp8_kv.calibrate_kv_scales(self.model, self.layers, vocab_size, self.device)
        for i, layer in enumerate(self.layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        self.num_blocks = num_blocks
        log.info(
            "KV cache: %d blocks of %d tokens, %s (%.2f GiB)",
            num_blocks,
            self.block_size,
            str(self.kv_dtype).removeprefix("torch."),
            num_blocks * self.kv_bytes_per_block / 2**30,
        )
        return num_blocks

    def enable_decode_graphs(self, max_model_len: int, use_graphs: bool = True) -> None:
        """Capture decode steps as CUDA graphs (after allocate_kv_cache); use_graphs=False runs the
        same padded static-buffer path eagerly, which is how CPU tests check it."""
        self.decode_graphs = DecodeGraphs(
            self.model,
            max_batch_size=min(self.config.max_num_seqs, 512),
            max_blocks_per_seq=-(-max_model_len // self.block_size),
            scratch_slot=self.num_blocks * self.block_size,
            device=self.device,
            use_graphs=use_graphs,
        )
        self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput):
        """Run one step; returns the SamplerOutput of the sampling sequences (device tensors)."""
        input_ids, positions, metadata, logits_indices = self._prepare(out)
        if self.decode_graphs is not None and self.decode_graphs.fits(metadata):
            hidden = self.decode_graphs.run(input_ids, positions, metadata)
        else:
            with attention_metadata(metadata):
                hidden = self.model(input_ids, positions)  # [T, hidden]
        scored = self._score(hidden, out)
        sampling = [seq for seq, samples in zip(out.seqs, out.is_sampling, strict=True) if samples]
        if not sampling:
            no_tokens = torch.empty(0, dtype=torch.int64, device=self.device)
            return None if scored is None else SamplerOutput(no_tokens, None, scored)
        logits = self.model.compute_logits(hidden[logits_indices]).float()  # [N, V]
        batch = SamplingBatch.build(
            [s.params for s in sampling],
            [s.prompt_token_ids for s in sampling],
            [s.output_token_ids for s in sampling],
            device=self.device,
            vocab_size=logits.shape[-1],
            token_bitmask=token_bitmask([s.grammar for s in sampling], logits.shape[-1]),
        )
        result = self.sampler(logits, batch)
        result.scored_logprobs = scored
        return result

    def _score(self, hidden: torch.Tensor, out: SchedulerOutput) -> torch.Tensor | None:
        """[S] per scoring sequence: the summed log-probabilities of the tokens it scores this step."""
        num_scoring = sum(seq.is_scoring for seq in out.seqs)
        if not num_scoring:
            return None
        rows, targets, owners = scoring_rows(out)
        sums = torch.zeros(num_scoring, dtype=torch.float32, device=self.device)
        if rows:
            rows_tensor = torch.tensor(rows, device=self.device)
            logprobs = self.model.compute_logits(hidden[rows_tensor]).float().log_softmax(dim=-1)
            picked = logprobs.gather(1, torch.tensor(targets, device=self.device)[:, None]).squeeze(1)
            sums.index_add_(0, torch.tensor(owners, device=self.device), picked)
        return sums

    def _prepare(self, out: SchedulerOutput):
        query_lens, context_lens, token_ids, starts = [], [], [], []
        for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            token_ids.extend(seq.token_ids[start : start + num_new])
            query_lens.append(num_new)
            context_lens.append(start + num_new)
            starts.append(start)
        device = self.device
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        seq_index = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)  # [T]
        cu_query = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        cu_query[1:] = torch.cumsum(q_lens, 0)
        positions = (
            torch.arange(int(cu_query[-1]))
            - cu_query[:-1].long()[seq_index]
            + torch.tensor(starts)[seq_index]
        )
        block_tables = _pad_block_tables(out.seqs)
        slots = (
            block_tables[seq_index, positions // self.block_size].long() * self.block_size
            + positions % self.block_size
        )
        cu_context = torch.zeros(len(context_lens) + 1, dtype=torch.int32)
        cu_context[1:] = torch.cumsum(torch.tensor(context_lens), 0)
        metadata = AttentionMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            cu_query_lens=cu_query.to(device),
            cu_context_lens=cu_context.to(device),
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32, device=device),
            slot_mapping=slots.to(device),
            block_tables=block_tables.to(device),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            is_decode_only=all(n == 1 for n in query_lens),
        )
        if metadata.is_decode_only:
            metadata.decode_groups = group_by_length(context_lens, device)
        sampling_rows = [i for i, samples in enumerate(out.is_sampling) if samples]
        logits_indices = (cu_query[1:].long() - 1)[sampling_rows].to(device)
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
        return input_ids, positions.to(device), metadata, logits_indices

    def _blocks_that_fit(self) -> int:
        if self.device.type == "cuda":
            return self._blocks_that_fit_cuda()
        return int(self.config.kv_cache_memory_gib * 2**30) // self.kv_bytes_per_block

    def _blocks_that_fit_cuda(self) -> int:
        # Profile a full-budget forward, then give the KV cache what the utilisation target leaves.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.max_num_batched_tokens
        with torch.inference_mode():
            dummy = torch.zeros(tokens, dtype=torch.int64, device=self.device)
            hidden = self.model(dummy, torch.arange(tokens, device=self.device))
            self.model.compute_logits(hidden[-self.config.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak_extra = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - (total - free) - peak_extra
        return int(budget) // self.kv_bytes_per_block


def _pad_block_tables(seqs: list[Sequence]) -> torch.Tensor:
    width = max(len(s.block_table) for s in seqs)
    return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
