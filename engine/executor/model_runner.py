"""ModelRunner: the only orchestration code that touches the device.

It owns the model, the paged KV cache, the persistent batch (the running sequences' block
tables, updated by what each StepPlan changed) and the sampler. Each step it turns the plan
into flat input tensors (the batch's new tokens laid end to end), runs the model with the
step's attention metadata, computes logits only for sequences that sample, and samples.

Every rank of a parallel engine runs one, on its shard of the model and its shard of the KV
cache (same block geometry everywhere). With pipeline parallelism the step is split into
micro-batches: a stage sends a micro-batch's activations on and starts the next one while
the following stage works on the first, so the stages overlap.
"""

from __future__ import annotations

import logging
import operator

import torch

from engine.config import EngineConfig
from engine.core.step_plan import StepPlan
from engine.core.structured_output import GrammarMasks
from engine.distributed import parallel_state as ps
from engine.executor.cuda_graphs import DecodeGraphs
from engine.executor.persistent_batch import PersistentBatch
from engine.executor.piecewise_graphs import PiecewiseGraphs, piecewise_sizes
from engine.executor.sampler import Sampler
from engine.executor.sampling_batch import SamplingBatch
from engine.forward_context import AttentionMetadata, attention_metadata, group_by_length
from engine.layers.attention import Attention
from engine.layers.attention_backends import make_backend
from engine.layers.rotary import RotaryEmbedding
from engine.lora import LoRASlots
from engine.outputs import ModelRunnerOutput
from engine.quant import kv_cache as fp8_kv
from engine.sampling_params import SamplingParams

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
        # one backend object for every layer; binding refuses a layer it cannot run
        attention = make_backend(backend, compiled_decode=not config.enforce_eager)
        for layer in self.layers:
            layer.backend = attention
        self.sampler = Sampler(generator=torch.Generator(device=self.device).manual_seed(config.seed))
        self.batch = PersistentBatch(block_size)
        self._last_sampled: torch.Tensor | None = None  # the last step's sampled ids, on the device
        # CUDA with async scheduling: results reach the host behind the step, not with a stream sync
        self._copy_results_async = config.uses_async_scheduling and self.device.type == "cuda"
        self._sampling = _ReusedSamplingBatch()
        # built per decode step only for a backend that reads them (the C++ and flash ones do not)
        self._uses_decode_groups = attention.reads_decode_groups(self.dtype, self.kv_dtype)
        self.num_blocks = 0
        self.decode_graphs: DecodeGraphs | None = None
        self.piecewise_graphs: PiecewiseGraphs | None = None
        self.lora: LoRASlots | None = None  # the adapters' device slots (engine.lora), set by build_runner

    @property
    def kv_bytes_per_block(self) -> int:
        layer = self.layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.kv_dtype.itemsize
        return per_token * self.block_size * len(self.layers)

    def blocks_that_fit(self) -> int:
        """KV blocks this rank can hold: `num_kv_blocks`, or what the memory budget leaves."""
        return self.config.num_kv_blocks or self._blocks_that_fit()

    def allocate_kv_cache(self, num_blocks: int | None = None) -> int:
        """Allocate a pool of `num_blocks` (default: what fits) and bind it to the layers."""
        num_blocks = self.blocks_that_fit() if num_blocks is None else num_blocks
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
            positions = self._profile_positions(fp8_kv.CALIBRATION_TOKENS)
            fp8_kv.calibrate_kv_scales(self.model, self.layers, vocab_size, positions)
        for i, layer in enumerate(self.layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        self.num_blocks = num_blocks
        self.layers[0].backend.warm_up(self.layers[0])  # compile what it compiles now: no step waits
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

    def enable_piecewise_graphs(self, use_graphs: bool = True) -> None:
        """Capture steps of up to 512 tokens in pieces between attention calls (after
        allocate_kv_cache); use_graphs=False runs the same split and padding eagerly (CPU tests)."""
        self.piecewise_graphs = PiecewiseGraphs(
            self.model,
            piecewise_sizes(self.config.max_num_batched_tokens),
            device=self.device,
            use_graphs=use_graphs,
        )
        self.piecewise_graphs.capture()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelRunnerOutput | None:
        """Run one step. Returns its ModelRunnerOutput (device tensors) on the sampling rank, else None.

        Every rank of a parallel engine calls this with the same plan at the same time; the
        sampling rank's plan carries the sampling rows (and their grammar masks and prompt
        logprob rows), the others' need not.
        """
        state = ps.get_parallel_state()
        self.batch.apply(plan)
        logits, hiddens = self._forward(plan, state)
        if not state.is_sampling_rank:
            return None
        result = self._sample(plan, logits, hiddens)
        if result is not None and self._copy_results_async:
            return result.to_host_async()
        return result

    def _forward(self, plan: StepPlan, state) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's stage over the plan's micro-batches (pipeline parallel: one per stage when
        there are enough sequences): the last stage's logits [n, V] and hidden states [t, H] each."""
        num_micro_batches = state.pp_size if plan.num_seqs >= 2 * state.pp_size else 1
        pending, logits, hiddens = [], [], []
        for micro in plan.split(num_micro_batches):
            input_ids, positions, metadata, logits_indices = self._prepare(micro)
            intermediate = None
            if not state.is_first_stage:
                shape = (input_ids.shape[0], self.model.config.hidden_size)
                intermediate = ps.recv_from_prev_stage([shape, shape], self.dtype, self.device)
            if self.decode_graphs is not None and self.decode_graphs.fits(metadata):
                result = self.decode_graphs.run(input_ids, positions, metadata)  # one process only
            elif self.piecewise_graphs is not None and self.piecewise_graphs.fits(input_ids.shape[0]):
                result = self.piecewise_graphs.run(input_ids, positions, metadata)  # one process only
            else:
                with attention_metadata(metadata):
                    result = self.model(input_ids, positions, intermediate)
            if not state.is_last_stage:
                pending.extend(ps.send_to_next_stage(list(result)))  # (hidden, residual)
                continue
            if plan.prompt_logprob_rows is not None or plan.pooling_rows is not None:
                hiddens.append(result)
            if logits_indices is None:  # every row samples at its only token: no gather
                logits.append(self.model.compute_logits(result))
            elif logits_indices.numel():
                logits.append(self.model.compute_logits(result[logits_indices]))
        for work, _tensor in pending:
            work.wait()
        return logits, hiddens

    def _sample(
        self, plan: StepPlan, logits: list[torch.Tensor], hiddens: list[torch.Tensor]
    ) -> ModelRunnerOutput | None:
        rows = plan.prompt_logprob_rows
        prompt_logprobs = prompt_top = None
        if rows is not None:
            prompt_logprobs, prompt_top = self._prompt_logprobs(
                torch.cat(hiddens), *rows, plan.prompt_logprob_top
            )
        pooled = None
        if plan.pooling_rows is not None:
            pooled = torch.cat(hiddens)[torch.tensor(plan.pooling_rows, device=self.device)].float()
        if not logits:
            no_tokens = torch.empty(0, dtype=torch.int64, device=self.device)
            if prompt_logprobs is None and pooled is None:
                return None
            return ModelRunnerOutput(no_tokens, None, prompt_logprobs, prompt_top, pooled)
        logits = (logits[0] if len(logits) == 1 else torch.cat(logits)).float()  # [N, V]
        masks = plan.grammar_masks
        if plan.late_grammar_masks is not None:  # filled by the host while the forward ran
            masks = plan.late_grammar_masks.wait()
        batch = self._sampling.build(plan, self.device, logits.shape[-1], masks)
        sampled = self.sampler(logits, batch)
        self._last_sampled = sampled.sampled_token_ids
        return ModelRunnerOutput(
            sampled.sampled_token_ids, sampled.logprobs, prompt_logprobs, prompt_top, pooled
        )

    @torch.inference_mode()
    def compute_all_logits(self, plan: StepPlan) -> torch.Tensor:
        """Logits [T, V] at every position the plan computes, in one process (quality measurements)."""
        self.batch.apply(plan)
        input_ids, positions, metadata, _ = self._prepare(plan)
        with attention_metadata(metadata):
            hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden)

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: list[int], targets: list[int], num_top: int = 0):
        """[R] float32: the log-probability of each target token given the hidden state at its row;
        with num_top > 0 also each row's num_top most likely tokens ([R, K] ids, [R, K] logprobs)."""
        rows_tensor = torch.tensor(rows, device=self.device)
        logprobs = self.model.compute_logits(hidden[rows_tensor]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=self.device)[:, None]).squeeze(1)
        if not num_top:
            return chosen, None
        values, ids = logprobs.topk(num_top, dim=-1)
        return chosen, (ids, values)

    def num_parameters(self) -> int:
        """Elements of this rank's share of the weights (a tied tensor counts once)."""
        return sum(p.numel() for p in self.model.parameters())

    def _prepare(self, plan: StepPlan):
        """The step's input tensors and attention metadata, from the persistent batch's rows."""
        step = self.batch.inputs(plan)
        device = self.device
        cu_query = torch.from_numpy(step.cu_query_lens)
        context_lens = step.context_lens.tolist()
        metadata = AttentionMetadata(
            query_lens=step.query_lens.tolist(),
            context_lens=context_lens,
            cu_query_lens=cu_query.to(device),
            cu_context_lens=torch.from_numpy(step.cu_context_lens).to(device),
            context_lens_tensor=torch.from_numpy(step.context_lens).to(device),
            slot_mapping=torch.from_numpy(step.slot_mapping).to(device),
            block_tables=torch.from_numpy(step.block_tables).to(device),
            max_query_len=int(step.query_lens.max()),
            max_context_len=int(step.context_lens.max()),
            is_decode_only=step.is_decode_only,
        )
        if metadata.is_decode_only and self._uses_decode_groups:
            metadata.decode_groups = group_by_length(context_lens, device)
        if self.lora is not None and plan.lora_names:
            metadata.lora = self.lora.prepare_step(plan.lora_names, metadata.query_lens)
        # the hidden-state rows whose logits are sampled; None: every row, in order (a decode step)
        logits_indices = None
        if not (step.is_decode_only and all(plan.is_sampling)):
            sampling_rows = [i for i, samples in enumerate(plan.is_sampling) if samples]
            logits_indices = (cu_query[1:].long() - 1)[sampling_rows].to(device)
        input_ids = torch.from_numpy(step.token_ids).to(device)
        if plan.input_rows_from_previous is not None:  # async scheduling: tokens still on the device
            input_ids = self._previous_tokens(plan.input_rows_from_previous)
        return input_ids, torch.from_numpy(step.positions).to(device), metadata, logits_indices

    def _previous_tokens(self, rows: list[int]) -> torch.Tensor:
        """[B] int64: the previous step's sampled tokens of `rows` (its rows in sampling order)."""
        previous = self._last_sampled
        if previous is None:
            raise RuntimeError("a step scheduled ahead, with no step before it on this runner")
        if len(rows) == previous.shape[0] and rows == list(range(len(rows))):
            return previous
        return previous[torch.tensor(rows, dtype=torch.int64).to(self.device)]

    def _blocks_that_fit(self) -> int:
        if self.device.type == "cuda":
            return self._blocks_that_fit_cuda()
        return int(self.config.kv_cache_memory_gib * 2**30) // self.kv_bytes_per_block

    def _profile_positions(self, tokens: int) -> torch.Tensor:
        """Positions for the profiling forward: within every RoPE table (a model whose context is
        shorter than the token budget would gather past its table: a device-side assert on CUDA)."""
        tables = [m.cos_sin_cache.shape[0] for m in self.model.modules() if isinstance(m, RotaryEmbedding)]
        return torch.arange(tokens, device=self.device) % min(tables, default=tokens)

    def _blocks_that_fit_cuda(self) -> int:
        # Profile a full-budget forward, then give the KV cache what the utilisation target leaves.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.max_num_batched_tokens
        state = ps.get_parallel_state()
        with torch.inference_mode():
            dummy = torch.zeros(tokens, dtype=torch.int64, device=self.device)
            # a pipeline stage after the first starts from activations; every rank profiles at once
            shape = (tokens, self.model.config.hidden_size)
            intermediate = (
                None
                if state.is_first_stage
                else [torch.zeros(shape, dtype=self.dtype, device=self.device)] * 2
            )
            hidden = self.model(dummy, self._profile_positions(tokens), intermediate)
            if state.is_last_stage:
                self.model.compute_logits(hidden[-self.config.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak_extra = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - (total - free) - peak_extra
        return int(budget) // self.kv_bytes_per_block


class _ReusedSamplingBatch:
    """The last step's SamplingBatch, reused while the same sequences sample with parameters that
    need nothing per step (no seed, penalty or logit bias): a decode batch's sampling tensors are
    then built once, not every step. Grammar masks change every step: only they are replaced."""

    def __init__(self) -> None:
        self._params: list[SamplingParams] = []
        self._batch: SamplingBatch | None = None

    def build(
        self, plan: StepPlan, device: torch.device, vocab_size: int, grammar_masks: GrammarMasks | None
    ) -> SamplingBatch:
        params = plan.sampling_params
        batch = self._batch
        if (
            batch is not None
            and len(params) == len(self._params)
            and all(map(operator.is_, params, self._params))
            and batch.logit_bias is None
            and batch.seen_mask is None
            and batch.output_counts is None
            and not batch.seeded_rows.numel()
        ):
            if grammar_masks is None and batch.grammar_masks is None:
                return batch
            self._batch = batch = batch.with_grammar_masks(grammar_masks, device)
            return batch
        self._params = list(params)
        self._batch = batch = SamplingBatch.build(
            params,
            plan.prompt_token_ids,
            plan.output_token_ids,
            device=device,
            vocab_size=vocab_size,
            grammar_masks=grammar_masks,
            output_lens=plan.output_lens,
        )
        return batch
