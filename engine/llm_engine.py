"""LLMEngine: add_request / abort / step, a stats() snapshot, and generate() for offline use.

One step, each arrow one way (nothing later calls back into an earlier stage):

    schedule    scheduler.schedule(): prompt chunks and decodes within the token budget
    -> plan     StepPlan.build(): the step's inputs, its prompt logprob and pooling rows
    -> execute  executor.execute(plan): the model and the sampler on every rank; one host sync
    -> update   scheduler.update_from_output(): appends tokens; EOS, stop tokens, max_tokens and
                grammars finish sequences, which free their blocks
    -> stages   every PostStepStage's update (engine/core/stages.py): parallel samples (n /
                best_of), choice scoring, pooling; each returns its effects
    -> outputs  output_processor.process(): text, stop strings, logprobs -> RequestOutputs,
                passed down the stages' holds

The stages and the output processor never call the scheduler: they return effects (forks to
add, sequences to finish, held outputs released), which `_apply` applies in one place.
Requests join (InputProcessor: tokenise and check) and leave between any two steps.
"""

from __future__ import annotations

import contextlib
import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.choice_scoring import ChoiceScorer
from engine.core.input_processor import InputProcessor, RequestRejected
from engine.core.output_processor import OutputProcessor
from engine.core.parallel_sampling import ParallelSampler
from engine.core.pooling import Pooler, PoolingParams
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.stages import PostStepStage, StageEffects, StepResult
from engine.core.stats import EngineStats, StepTotals
from engine.core.step_plan import PoolingRows, PromptLogprobRows, StepPlan
from engine.distributed.layout import check_parallel_layout
from engine.executor.cuda_graphs import use_decode_graphs
from engine.executor.executor import EngineDeadError, MultiprocExecutor, UniprocExecutor
from engine.executor.runtime import resolve_dtype, resolve_model_spec
from engine.loader.checkpoint import read_checkpoint
from engine.outputs import ModelRunnerOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestFailed", "RequestRejected"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config = resolve_dtype(config)  # every rank gets the concrete dtype
        self.config = config
        # the checkpoint's facts, read once here and handed down (the tokenizer stays in this process)
        checkpoint, self.tokenizer = read_checkpoint(config.model, config.max_model_len)
        self.checkpoint = checkpoint
        self.generation_defaults = checkpoint.generation_defaults  # for front ends to apply
        self.vocab_size, self.architectures = checkpoint.vocab_size, checkpoint.architectures
        self.max_model_len = checkpoint.max_model_len
        # the backend, block size and quantisation plan every rank loads by: a compression mode or
        # a parallel layout that cannot run here is refused before anything loads
        spec = resolve_model_spec(config, checkpoint)
        self.attention_backend, self.block_size = spec.attention_backend, spec.block_size
        check_parallel_layout(config, checkpoint.hf_config)
        # tensor/pipeline parallel: worker processes for the other ranks; this process is rank 0
        executor_class = MultiprocExecutor if config.world_size > 1 else UniprocExecutor
        self.executor = executor_class(config, spec)
        self.runner = self.executor.runner  # rank 0's
        use_decode_graphs(self.runner, config, self.attention_backend, self.max_model_len)
        self._build_stages(checkpoint.eos_token_ids)
        self._step_totals = StepTotals()
        self._requests: dict[str, Sequence] = {}  # unfinished requests (their own sequences)
        self._aborted: list[RequestOutput] = []  # aborted between steps, reported by the next step()
        self._failed: list[RequestFailed] = []  # failed by a step's processing, for take_failed()
        # async scheduling: the model runs on a thread of its own, a step ahead of the host
        self._model_thread = None
        if config.uses_async_scheduling:
            device = torch.device(config.device)
            # CUDA: the thread's current device is the engine's (events and streams are per device)
            initializer = None
            if device.type == "cuda" and device.index is not None:
                initializer = lambda: torch.cuda.set_device(device)  # noqa: E731
            self._model_thread = ThreadPoolExecutor(
                1, thread_name_prefix="sluice-model", initializer=initializer
            )
        self._running: _RunningStep | None = None  # the step scheduled ahead, still on the model thread

    def _build_stages(self, eos_token_ids: frozenset[int]) -> None:
        """The step's stages over the KV blocks the executor allocated (after the model loaded)."""
        config = self.config
        self.block_manager = BlockManager(
            self.executor.num_blocks, self.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            eos_token_ids,
            config.priority_aging_steps,
            config.max_loras if config.lora_adapters else 0,
        )
        self.input_processor = InputProcessor(
            config,
            self.tokenizer,
            self.vocab_size,
            self.max_model_len,
            eos_token_ids,
            self.block_manager.num_blocks,
            self.block_size,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.parallel_sampler = ParallelSampler(self.input_processor.fork_grammar)
        self.choice_scorer = ChoiceScorer()
        self.pooler = Pooler()
        # in the order an output passes down their holds: a sample's output is gathered into its
        # request's first, whose choices are then scored
        self.stages: list[PostStepStage] = [self.parallel_sampler, self.choice_scorer, self.pooler]

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams,
        priority: int = 0,
    ) -> None:
        """Queue a request; it runs from the next step on. Raises RequestRejected if it cannot run.
        PoolingParams: an embedding request (its output's `embedding`; engine/core/pooling.py)."""
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already running")
        if isinstance(params, PoolingParams):
            seq = self.input_processor.process_pooling(request_id, prompt, params.pooling, priority)
            self.output_processor.add(seq)
            self._requests[request_id] = seq
            self.scheduler.add(seq)
            return
        request = self.input_processor.process(request_id, prompt, params, priority)
        seq = request.seq
        if request.choice_token_ids is not None:
            self.choice_scorer.add(seq, params.structured_outputs.choice, request.choice_token_ids)
        self.parallel_sampler.add(seq)
        self.output_processor.add(seq)
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str, report: bool = True) -> bool:
        """Cancel a request now: its blocks return to the pool; the next step() reports it ("abort"),
        unless `report` is False (the caller has already answered the request another way)."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        effects = [stage.abort(seq) for stage in self.stages]
        if not seq.is_finished:
            effects.append(StageEffects(finish=[(seq, "abort", None)]))
        for s, _, _ in (finish for e in effects for finish in e.finish):
            if s is not seq:
                self.output_processor.forget(s)
        # a held output: its text was done, its choices were being scored
        held = [output for _, output, _ in self._apply(effects)]
        if report:
            self._aborted.append(held[0] if held else self.output_processor.abort(seq))
        else:  # nothing to decode: a request failed by its own text is answered without it
            self.output_processor.forget(seq)
        return True

    def step(self) -> list[RequestOutput]:
        """Run one iteration of the continuous batch; returns the requests that finished."""
        outputs, self._aborted = self._aborted, []
        if self._running is not None:  # async scheduling: scheduled ahead, on the model thread
            running, self._running = self._running, None
        else:
            out = self.scheduler.schedule()
            if out.is_empty:
                return outputs
            running = self._submit(out)
        if self._model_thread is not None and running.future is not None:
            # Step N+1 scheduled and its inputs prepared while step N runs; its inputs are the
            # tokens N samples, which stay on the device. It is read back by the next step().
            ahead = self.scheduler.schedule_ahead(running.out)
            if ahead is not None:
                self._running = self._submit(ahead, ahead_of=running.out)
        out = running.out
        # the grammar masks of the step ahead: they follow this step's tokens, so they are filled
        # once the grammars have read them, while the step ahead's forward runs
        late_masks = self._running.plan.late_grammar_masks if self._running is not None else None
        try:
            step = self._execute(running, outputs)
            step.prompt_logprob_rows, step.pooling_rows = running.prompt_logprob_rows, running.pooling_rows
            # After the model run, an error raised by one request's data (its grammar, the decode
            # of its tokens, a stage's record of it) fails that request alone: see take_failed().
            failures: dict[Sequence, Exception] = {}
            finished = self.scheduler.update_from_output(out, step.token_ids, failures)
        except BaseException as e:
            if late_masks is not None:  # the model thread must not wait for them for ever
                late_masks.fail(e)
            raise
        if late_masks is not None:
            late_masks.fill()
        effects = [self._update_stage(stage, step, failures) for stage in self.stages]
        processed = self.output_processor.process(
            out.sampling_seqs, step.token_ids, step.logprobs, finished, failures
        )
        released = self._apply([*effects, processed.effects])
        outputs += self._pass_down(released, failures)
        outputs += self._pass_down([(seq, output, 0) for seq, output in processed.outputs], failures)
        failed = self._fail(failures)
        outputs = [output for output in outputs if output.request_id not in failed]
        for output in outputs:
            self._requests.pop(output.request_id, None)
        return outputs

    def take_failed(self) -> list[RequestFailed]:
        """The requests that steps failed since the last call, one error each: the processing of
        a request's own step output raised (outside the model run). They are out of the engine
        (blocks freed) and step() does not report them; the other requests went on."""
        failed, self._failed = self._failed, []
        return failed

    def _update_stage(
        self, stage: PostStepStage, step: StepResult, failures: dict[Sequence, Exception]
    ) -> StageEffects:
        """A stage's update; if it raises, the step's sequences it may have been recording fail
        (a stage reads the whole step, so the one sequence at fault is not known)."""
        try:
            return stage.update(step)
        except Exception as e:
            for seq in step.scheduled.seqs:
                failures.setdefault(seq, e)
            return StageEffects()

    def _fail(self, failures: dict[Sequence, Exception]) -> set[str]:
        """Take the failed sequences' requests out of the engine; returns their ids."""
        failed = set()
        for seq, error in failures.items():
            if seq.request_id in failed or seq.request_id not in self._requests:
                continue
            failed.add(seq.request_id)
            self.abort(seq.request_id, report=False)  # answered by take_failed(), with the error
            self._failed.append(RequestFailed(seq.request_id, error))
        return failed

    def _apply(self, effects: list[StageEffects]) -> list[tuple[Sequence, RequestOutput, int]]:
        """The one place where what the stages (effects[i]: self.stages[i]'s) and the output
        processor asked for happens: sequences finish, forks join the batch. Returns the released
        outputs, each with the stage after the one that held it (where it goes on down the holds)."""
        released = []
        for index, stage_effects in enumerate(effects):
            for seq, reason, stop_reason in stage_effects.finish:
                if not seq.is_finished:
                    self.scheduler.finish(seq, reason, stop_reason)
            for fork in stage_effects.forks:
                self.output_processor.add(fork)
                self.scheduler.add(fork)
            released += [(seq, output, index + 1) for seq, output in stage_effects.released]
        return released

    def _pass_down(
        self, items: list[tuple[Sequence, RequestOutput, int]], failures: dict[Sequence, Exception]
    ) -> list[RequestOutput]:
        """Pass finished outputs down the stages' holds, each from the stage given; the outputs
        that come out at the bottom are the requests' results. A hold that raises fails its
        sequence (recorded in `failures`)."""
        results = []
        for seq, output, first in items:
            held = (seq, output)
            try:
                for stage in self.stages[first:]:
                    held = stage.hold(*held)
                    if held is None:
                        break
            except Exception as e:
                failures.setdefault(seq, e)
                continue
            if held is not None:
                results.append(held[1])
        return results

    def _submit(self, out: SchedulerOutput, ahead_of: SchedulerOutput | None = None) -> _RunningStep:
        """Plan a scheduled step and start it: on the model thread with async scheduling (after
        the step before it, whose sampled tokens it may read), else when _execute reads it."""
        self._step_totals.record(out)
        prompt_logprob_rows, pooling_rows = PromptLogprobRows.of(out), PoolingRows.of(out)
        released = self.block_manager.take_released()  # the runners drop those rows
        plan = StepPlan.build(out, self.vocab_size, prompt_logprob_rows, pooling_rows, released, ahead_of)
        running = _RunningStep(out, plan, prompt_logprob_rows, pooling_rows)
        if self._model_thread is not None:
            running.future = self._model_thread.submit(self.executor.execute, plan)
        return running

    def _execute(self, running: _RunningStep, outputs: list[RequestOutput]) -> StepResult:
        """The model run and its one host sync: the step's results on the host."""
        out = running.out
        try:
            if running.future is not None:
                result = running.future.result()
            else:
                result = self.executor.execute(running.plan)
        except EngineDeadError:
            raise
        except Exception as e:
            if self.config.world_size > 1:
                raise  # ranks may have parted ways mid-step: rerunning it could hang a collective
            # The model run failed (out of memory, a device hiccup) before anything of the step was
            # applied: its sequences go back to the queue, to be recomputed by a later step (a
            # pooling request restarts its sums when its prompt is recomputed from the start). A
            # step scheduled ahead of it read its tokens: it is waited for and undone too.
            seqs = list(out.seqs)
            if self._running is not None:
                ahead, self._running = self._running, None
                if ahead.plan.late_grammar_masks is not None:  # its sampler waits for them: release it
                    ahead.plan.late_grammar_masks.fail(RuntimeError("the step before it failed"))
                with contextlib.suppress(Exception):
                    ahead.future.result()
                seqs += [seq for seq in ahead.out.seqs if seq not in set(seqs)]
            self.scheduler.requeue(seqs)
            self._aborted = outputs + self._aborted  # still to be reported
            raise StepFailed(sorted({seq.request_id for seq in seqs}), e) from e
        return _on_host(out, result)

    def stats(self) -> EngineStats:
        """A snapshot for monitoring; safe to call from any thread."""
        bm = self.block_manager
        lora = self.runner.lora.totals if self.runner.lora is not None else None
        return EngineStats(
            num_running_seqs=len(self.scheduler.running),
            num_waiting_seqs=len(self.scheduler.waiting),
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            prefix_cache_queried_tokens=bm.stats.queried_tokens,
            prefix_cache_hit_tokens=bm.stats.hit_tokens,
            steps=copy.copy(self._step_totals),
            lora_slot_hits=lora.hits if lora else 0,
            lora_slot_loads=lora.loads if lora else 0,
            lora_load_seconds=lora.load_seconds if lora else 0.0,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._aborted or self._running)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Offline: run every prompt to completion; outputs in prompt order. Raises the first
        RequestFailed, if any, once the other requests have finished."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(request_id, prompt, p)
        outputs: dict[str, RequestOutput] = {}
        failed: list[RequestFailed] = []
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.has_unfinished_requests():
                done = self.step()
                outputs.update((o.request_id, o) for o in done)
                failed_now = self.take_failed()
                failed += failed_now
                bar.update(len(done) + len(failed_now))
        if failed:  # the others ran to their end first: the engine is left empty
            raise failed[0]
        return [outputs[i] for i in ids]

    def close(self) -> None:
        """Stop and reap the worker processes of a parallel engine, and the model thread."""
        if self._model_thread is not None:
            running = self._running
            if running is not None and running.plan.late_grammar_masks is not None:
                # no step() reads the step before it any more: its masks would never come
                running.plan.late_grammar_masks.fail(RuntimeError("the engine is closing"))
            self._model_thread.shutdown(wait=True)  # a step scheduled ahead finishes first
        self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(slots=True)
class _RunningStep:
    """A planned step: its scheduler output and plan, and with async scheduling its model run."""

    out: SchedulerOutput
    plan: StepPlan
    prompt_logprob_rows: PromptLogprobRows | None
    pooling_rows: PoolingRows | None
    future: Future[ModelRunnerOutput | None] | None = None


class RequestFailed(RuntimeError):
    """Processing the request's own step output raised `cause` outside the model run (its text's
    decode, its grammar, a stage); the request is out of the engine and the others go on."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(
            f"the engine could not process the output of request {request_id!r}: "
            f"{type(cause).__name__}: {cause}"
        )
        self.request_id = request_id
        self.cause = cause
        self.__cause__ = cause  # a log of this error shows where the cause was raised


class StepFailed(RuntimeError):
    """step()'s model run raised `cause`; the step's requests are queued again (nothing was lost)."""

    def __init__(self, request_ids: list[str], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids  # the requests the failed step ran
        self.cause = cause


def _on_host(out: SchedulerOutput, result: ModelRunnerOutput | None) -> StepResult:
    """The runner's device tensors as the core reads them (the step's one host sync)."""
    step = StepResult(out, [], None)
    if result is None:
        return step
    result.wait()  # async scheduling on CUDA: this step's copies, not the step queued after it
    step.token_ids = result.sampled_token_ids.tolist()
    step.logprobs = result.logprobs
    if result.prompt_logprobs is not None:
        step.prompt_logprobs = result.prompt_logprobs.tolist()
    if result.prompt_top_logprobs is not None:
        ids, values = result.prompt_top_logprobs
        step.prompt_top_logprobs = (ids.tolist(), values.tolist())
    if result.pooled_hidden is not None:
        step.pooled_hidden = result.pooled_hidden.cpu()
    return step
