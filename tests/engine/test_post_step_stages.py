"""The post-step stages' one contract (engine/core/stages.py): a stage returns effects and never
holds the scheduler; LLMEngine.step applies every effect in one place, and finishes a sequence
once; stop strings count from min_tokens on, where they end in the newest token (tiny model and
hand-made sequences, CPU)."""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, PoolingParams, SamplingParams
from engine.core.choice_scoring import ChoiceScorer
from engine.core.output_processor import OutputProcessor
from engine.core.parallel_sampling import ParallelSampler
from engine.core.pooling import Pooler
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.stages import PostStepStage, StepResult
from engine.outputs import ModelRunnerOutput, SampledLogprobs
from engine.sampling_params import StructuredOutputs

PROMPT = list(range(4, 4 + 20))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), block_size=16, num_kv_blocks=64)
    )


def test_every_stage_has_the_one_contract_and_none_takes_the_scheduler():
    for stage_class in (ParallelSampler, ChoiceScorer, Pooler):
        for method in ("update", "hold", "abort"):
            ours = inspect.signature(getattr(stage_class, method))
            contract = inspect.signature(getattr(PostStepStage, method))
            assert list(ours.parameters) == list(contract.parameters), (stage_class, method)
        assert not any(
            "scheduler" in name.lower() for name in inspect.signature(stage_class.__init__).parameters
        )


def test_a_stage_returns_its_forks_and_leaves_the_batch_alone():
    seq = Sequence("r", PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=4), 4)
    sampler = ParallelSampler(grammar_of=lambda fork: None)
    sampler.add(seq)
    seq.num_computed_tokens = len(PROMPT)  # its prompt was computed this step
    scheduled = SchedulerOutput(seqs=[seq], num_new_tokens=[len(PROMPT)], is_sampling=[True])
    effects = sampler.update(StepResult(scheduled, [7], None))
    assert [fork.parent for fork in effects.forks] == [seq, seq]
    assert all(fork.status.value == "waiting" and not fork.block_table for fork in effects.forks)


def test_the_step_adds_and_finishes_sequences_only_where_it_applies_effects(engine, monkeypatch):
    """Forks (n, choices) and stop strings: the scheduler hears of them from one place, once each."""
    callers: dict[str, Counter] = {"add": Counter(), "finish": Counter()}
    finished: Counter = Counter()
    scheduler = engine.scheduler

    def spy(name):
        original = getattr(Scheduler, name)

        def wrapper(seq, *args):
            callers[name][inspect.stack()[1].function] += 1
            if name == "finish":
                finished[seq] += 1
            return original(scheduler, seq, *args)

        return wrapper

    monkeypatch.setattr(scheduler, "add", spy("add"))
    monkeypatch.setattr(scheduler, "finish", spy("finish"))
    engine.add_request("n", PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=5, ignore_eos=True))
    choice = StructuredOutputs(choice=["yes", "no", "maybe"])
    engine.add_request("choice", PROMPT, SamplingParams(temperature=0, structured_outputs=choice))
    engine.add_request("stop", PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=["e", "a", " "]))
    engine.add_request("embed", PROMPT, PoolingParams())
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert set(outputs) == {"n", "choice", "stop", "embed"}
    assert len(outputs["n"].samples) == 3 and outputs["choice"].text in {"yes", "no", "maybe"}
    assert outputs["embed"].embedding is not None
    assert set(callers["add"]) == {"add_request", "_apply"}  # 2 samples' and 3 scorers' forks
    assert callers["add"]["_apply"] == 2 + 3
    assert set(callers["finish"]) <= {"_update_seq", "_apply"}  # update_from_output, per sequence
    assert max(finished.values()) == 1  # no sequence is finished twice


def test_an_abort_finishes_the_requests_forks_through_the_same_place(engine, monkeypatch):
    engine.add_request("n", PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=30, ignore_eos=True))
    engine.step()  # the prompt: the samples fork
    engine.step()
    forks = [s for s in engine.scheduler.running if s.request_id == "n"]
    assert len(forks) == 3
    engine.abort("n")
    assert all(s.is_finished and s.finish_reason == "abort" for s in forks)
    (output,) = engine.step()
    assert output.finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_runner_output_keeps_every_field_on_its_way_to_the_host():
    """A worker sends ModelRunnerOutput.cpu(): pooled hidden states and prompt logprobs included."""
    output = ModelRunnerOutput(
        torch.tensor([3]),
        SampledLogprobs(torch.tensor([-0.5]), torch.tensor([[3]]), torch.tensor([[-0.5]])),
        torch.tensor([-1.0, -2.0]),
        (torch.tensor([[1], [2]]), torch.tensor([[-0.1], [-0.2]])),
        torch.ones(2, 4),
    )
    copy = output.cpu()
    for field in dataclasses.fields(ModelRunnerOutput):
        if field.name != "ready":  # to_host_async's event, not a result
            assert getattr(copy, field.name) is not None, field.name
    assert torch.equal(copy.pooled_hidden, output.pooled_hidden)


class _Characters:
    """A tokenizer whose token i is the character CHARS[i]."""

    CHARS = "ab cd"

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(self.CHARS[i] for i in token_ids)


def _run_to_stop(params: SamplingParams, tokens: str) -> tuple[str, int]:
    """Feed `tokens` one per step as the engine does; (the output text, tokens generated)."""
    processor = OutputProcessor(_Characters())
    seq = Sequence("r", [0], params, params.max_tokens)
    processor.add(seq)
    for char in tokens:
        token = _Characters.CHARS.index(char)
        seq.append_token(token)
        processed = processor.process([seq], [token], None, [])
        if processed.outputs:
            ((_, output),) = processed.outputs
            return output.text, seq.num_output_tokens
    raise AssertionError("no stop")


@pytest.mark.parametrize(
    ("min_tokens", "text", "count"),
    [
        (0, "ab", 3),  # the first space stops it
        (4, "ab cd", 6),  # the space before min_tokens neither stops nor cuts the text
        (3, "ab", 3),  # reached at the space: it stops there
    ],
)
def test_a_stop_string_counts_from_min_tokens_on_and_cuts_where_it_stopped(min_tokens, text, count):
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=min_tokens, stop=[" "])
    assert _run_to_stop(params, "ab cd ab") == (text, count)
