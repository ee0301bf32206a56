"""LLMEngine: add_request / abort / step, and generate() for offline use.

Each step the scheduler picks work within the token budget (prompt chunks and decodes of
many requests together), the model runner computes it on the paged KV cache and samples, and
the engine checks every sampled token against its request's stop conditions. Requests join
and leave between any two steps.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.distributed.executor import MultiprocExecutor, UniprocExecutor
from engine.distributed.layout import check_parallel_layout
from engine.layers.attention_backends import select_backend
from engine.loader import check_checkpoint_folder, load_tokenizer
from engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.step_plan import StepPlan

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request cannot run on this engine (too long, bad token ids); nothing was queued."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        hf_config = check_checkpoint_folder(config.model)
        self.tokenizer = load_tokenizer(config.model)
        device = torch.device(config.device)
        self.attention_backend = select_backend(config.attention_backend, device)
        self.block_size = config.block_size or (256 if self.attention_backend == "flash" else 16)
        if self.attention_backend == "flash" and self.block_size % 256:
            raise ValueError(
                f"FlashAttention needs block_size to be a multiple of 256, got {self.block_size}"
            )
        check_parallel_layout(config, hf_config)
        self.vocab_size: int = hf_config["vocab_size"]
        model_limit = hf_config.get("max_position_embeddings") or 2048
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer)
        # tensor/pipeline parallel: worker processes for the other ranks; this process is rank 0
        executor_class = MultiprocExecutor if config.world_size > 1 else UniprocExecutor
        self.executor = executor_class(config, self.attention_backend, self.block_size)
        self.runner = self.executor.runner  # rank 0's
        self.block_manager = BlockManager(self.executor.num_blocks, self.block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
        )
        self._seqs: dict[str, Sequence] = {}
        self._finished: list[RequestOutput] = []  # aborted between steps, reported by the next step()
        self._logprobs: dict[str, list[TokenLogprob]] = {}

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> None:
        """Queue a request; it runs from the next step on. Raises RequestRejected if it cannot run."""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already running")
        self._check_prompt(token_ids)
        max_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        self._check_fits(len(token_ids), max_tokens)
        seq = Sequence(request_id, token_ids, params, max_tokens, priority)
        self._seqs[request_id] = seq
        if params.logprobs is not None:
            self._logprobs[request_id] = []
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request now: its blocks return to the pool; the next step() reports it ("abort")."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._finished.append(self._output(seq))
        return True

    def close(self) -> None:
        """Stop and reap the worker processes of a parallel engine (nothing to do otherwise)."""
        self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished)

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    def step(self) -> list[RequestOutput]:
        """Run one iteration of the continuous batch; returns the requests that finished."""
        finished, self._finished = self._finished, []
        out = self.scheduler.schedule()
        if out.is_empty:
            return finished
        sampled = self.executor.execute(StepPlan.build(out))
        token_ids = sampled.sampled_token_ids.tolist() if sampled is not None else []  # the step's one sync
        self.scheduler.update_from_output(out, token_ids)
        sampling = _sampling_seqs(out)
        if sampled is not None and sampled.logprobs is not None:
            self._record_logprobs(sampling, token_ids, sampled.logprobs)
        for seq in sampling:
            reason = self._stop_reason(seq)
            if reason is not None:
                self.scheduler.finish(seq, *reason)
                finished.append(self._output(seq))
        return finished

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Offline: run every prompt to completion; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(request_id, prompt, p)
        outputs: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.has_unfinished_requests():
                done = self.step()
                outputs.update((o.request_id, o) for o in done)
                bar.update(len(done))
        return [outputs[i] for i in ids]

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise RequestRejected("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {len(token_ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} so that one token can be generated"
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.max_num_batched_tokens:
            raise RequestRejected(
                f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}, and chunked prefill is off"
            )

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        # A sequence larger than the whole pool would preempt itself forever.
        needed = -(-(num_prompt_tokens + max_tokens) // self.block_size)
        if needed > self.block_manager.num_blocks:
            raise RequestRejected(
                f"prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) need {needed} KV blocks; "
                f"the cache has {self.block_manager.num_blocks}"
            )

    def _stop_reason(self, seq: Sequence) -> tuple[str, str | int | None] | None:
        token_id = seq.token_ids[-1]
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return "stop", token_id
        if params.stop:
            text = self._decode(seq.output_token_ids)
            for stop in params.stop:
                if stop in text:
                    return "stop", stop
        if seq.num_output_tokens >= seq.max_tokens:
            return "length", None
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        self._seqs.pop(seq.request_id, None)
        output_ids = seq.output_token_ids
        text_ids = (
            output_ids[:-1] if isinstance(seq.stop_reason, int) else output_ids
        )  # the stop token is not text
        text = self._decode(text_ids)
        if isinstance(seq.stop_reason, str):
            text = text[: text.find(seq.stop_reason)]
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, time.time(), seq.num_preemptions)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=output_ids,
            text=text,
            finish_reason=seq.finish_reason,
            metrics=metrics,
            stop_reason=seq.stop_reason,
            logprobs=self._logprobs.pop(seq.request_id, None),
        )

    def _record_logprobs(self, sampling: list[Sequence], token_ids: list[int], logprobs) -> None:
        sampled = logprobs.sampled_logprobs.tolist()
        top_ids, top_values = logprobs.top_token_ids.tolist(), logprobs.top_logprobs.tolist()
        for row, seq in enumerate(sampling):
            record = self._logprobs.get(seq.request_id)
            if record is None:
                continue
            k = seq.params.logprobs or 0
            top = list(zip(top_ids[row][:k], top_values[row][:k], strict=True))
            record.append(TokenLogprob(token_ids[row], sampled[row], top))

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _sampling_seqs(out: SchedulerOutput) -> list[Sequence]:
    return [seq for seq, samples in zip(out.seqs, out.is_sampling, strict=True) if samples]


def _eos_token_ids(hf_config: dict, tokenizer) -> set[int]:
    eos = hf_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
