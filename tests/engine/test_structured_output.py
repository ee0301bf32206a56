"""Structured outputs: choice, regex and JSON schema constrain what is generated; choices get probabilities.

On the tiny checkpoint (float32, CPU). Its random weights make unconstrained text gibberish,
which is what makes these tests telling: whatever comes out valid is the constraint's doing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, RequestRejected, SamplingParams, StructuredOutputs

PROMPTS = ["The river is cold today", "Hello", "Many people went home, and the river"]
LABELS = ["positive", "negative", "pos", "neutral"]  # "pos" is a prefix of "positive"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint)))


def _params(spec: StructuredOutputs, **kw) -> SamplingParams:
    return SamplingParams(structured_outputs=spec, **{"max_tokens": 64, **kw})


def _brute_force_choice_probabilities(
    model, prompt_ids: list[int], choice_ids: list[list[int]]
) -> list[float]:
    """log P(choice tokens, EOS | prompt) from full forward passes, softmaxed over the choices."""
    scores = []
    for ids in choice_ids:
        full = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            logprobs = model(full).logits[0].float().log_softmax(-1)
        positions = range(len(prompt_ids) - 1, full.shape[1] - 1)
        scores.append(sum(float(logprobs[p, full[0, p + 1]]) for p in positions))
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


# --- choice -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_output_is_always_one_of_the_choices_with_probabilities_summing_to_one(
    engine: LLMEngine, temperature: float
) -> None:
    params = _params(StructuredOutputs(choice=LABELS), temperature=temperature, seed=None)
    outputs = engine.generate(PROMPTS * 3, params, use_tqdm=False)
    for output in outputs:
        assert output.text in LABELS
        assert output.finish_reason == "stop"
        assert set(output.choice_probabilities) == set(LABELS)
        assert sum(output.choice_probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(0.0 <= p <= 1.0 for p in output.choice_probabilities.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_choice_probabilities_match_a_brute_force_computation_from_the_models_logits(
    engine: LLMEngine, tiny_checkpoint: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    # one prompt past a 16-token block, so the scoring sequences take its first block from the cache
    prompts = [*PROMPTS, "The river is cold today, and many people went home because the river was cold"]
    outputs = engine.generate(
        prompts, _params(StructuredOutputs(choice=LABELS), temperature=0.0), use_tqdm=False
    )
    eos = engine.tokenizer.eos_token_id
    choice_ids = [[*engine.tokenizer.encode(c, add_special_tokens=False), eos] for c in LABELS]
    for output in outputs:
        expected = _brute_force_choice_probabilities(model, output.prompt_token_ids, choice_ids)
        got = [output.choice_probabilities[c] for c in LABELS]
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert max(len(o.prompt_token_ids) for o in outputs) > 16


def test_choice_probabilities_are_the_same_with_prefix_caching_on_and_off_and_under_preemption(
    tiny_checkpoint: Path,
) -> None:
    prompt = "The river is cold today, and many people went home because the river was cold and"
    spec = StructuredOutputs(choice=LABELS)
    # 8 blocks of 4 tokens and 4-token steps: requests and scoring sequences preempt each other
    tiny_pool = {"num_kv_blocks": 8, "block_size": 4, "max_num_batched_tokens": 4}
    results = []
    for options in ({"enable_prefix_caching": False}, {}, tiny_pool):
        engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), **options))
        preempted = _spy_on_preemptions(engine)
        # sampled with a seed: decoded token by token (a greedy choice is only scored)
        params = _params(spec, temperature=1.0, seed=7, max_tokens=12)
        outputs = engine.generate([prompt] * 4, params, use_tqdm=False)
        results.append([(o.text, o.choice_probabilities) for o in outputs])
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert {seq.parent is not None for seq in preempted} == {True, False}  # in the tiny pool, both kinds
    for text_and_probs in results[1:]:
        for (text, probs), (ref_text, ref_probs) in zip(text_and_probs, results[0], strict=True):
            assert text == ref_text
            assert [probs[c] for c in LABELS] == pytest.approx([ref_probs[c] for c in LABELS], rel=1e-4)


def test_a_greedy_choice_answers_the_choice_its_probabilities_name(engine: LLMEngine) -> None:
    prompts = [*PROMPTS, "Sentiment of: the soup was cold. Answer:", "I loved it", "Terrible, awful"]
    outputs = engine.generate(
        prompts, _params(StructuredOutputs(choice=LABELS), temperature=0.0), use_tqdm=False
    )
    for output in outputs:
        best = max(output.choice_probabilities, key=output.choice_probabilities.get)
        assert output.text == best
        assert output.token_ids == engine.tokenizer.encode(best, add_special_tokens=False)
        assert (output.finish_reason, output.stop_reason) == ("stop", None)  # as the grammar ends it
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_greedy_choice_gives_its_tokens_logprobs_with_alternatives(engine: LLMEngine) -> None:
    params = _params(StructuredOutputs(choice=LABELS), temperature=0.0, logprobs=3)
    (output,) = engine.generate(["The river is cold today"], params, use_tqdm=False)
    assert [lp.token_id for lp in output.logprobs] == output.token_ids
    for lp in output.logprobs:
        assert len(lp.top) == 3 and lp.logprob <= lp.top[0][1] + 1e-6  # the best alternative first
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def _spy_on_preemptions(engine: LLMEngine) -> list:
    preempted = []
    preempt = engine.scheduler._preempt

    def spy(seq):
        preempted.append(seq)
        preempt(seq)

    engine.scheduler._preempt = spy
    return preempted


def test_a_choice_is_never_cut_short_by_a_small_max_tokens(engine: LLMEngine) -> None:
    params = _params(StructuredOutputs(choice=LABELS), temperature=1.0, max_tokens=1)
    outputs = engine.generate(PROMPTS * 3, params, use_tqdm=False)
    assert all(o.text in LABELS and o.finish_reason == "stop" for o in outputs)
    assert max(len(o.token_ids) for o in outputs) > 1


def test_aborting_a_choice_request_while_its_choices_are_scored_gives_every_block_back(
    engine: LLMEngine,
) -> None:
    engine.add_request("choice-abort", "The river is cold today", _params(StructuredOutputs(choice=LABELS)))
    engine.step()  # prefill; the scoring sequences are queued
    assert len(engine.scheduler.waiting) + len(engine.scheduler.running) > 1
    assert engine.abort("choice-abort")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason, o.choice_probabilities) for o in outputs] == [
        ("choice-abort", "abort", None)
    ]
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_without_a_choice_report_no_probabilities(engine: LLMEngine) -> None:
    output = engine.generate(["Hello"], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert output.choice_probabilities is None


# --- regex and JSON -----------------------------------------------------------------------


def test_regex_outputs_fully_match(engine: LLMEngine) -> None:
    pattern = r"(yes|no), [0-9]{1,3} (apples|pears)!"
    params = _params(StructuredOutputs(regex=pattern), temperature=1.0, max_tokens=40)
    outputs = engine.generate(PROMPTS * 3, params, use_tqdm=False)
    for output in outputs:
        assert output.finish_reason == "stop"
        assert re.fullmatch(pattern, output.text), output.text


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
            },
            "required": ["name", "age", "pets"],
            "additionalProperties": False,
        },
    },
    "required": ["label", "tags", "owner"],
    "additionalProperties": False,
}


def test_json_schema_outputs_parse_and_validate(engine: LLMEngine) -> None:
    params = _params(StructuredOutputs(json=SCHEMA), temperature=1.0, max_tokens=200)
    outputs = engine.generate(PROMPTS * 2, params, use_tqdm=False)
    for output in outputs:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), SCHEMA)


def test_json_object_outputs_parse_as_an_object(engine: LLMEngine) -> None:
    # any object is allowed, so the random model may ramble past max_tokens: only finished ones parse
    params = _params(StructuredOutputs(json_object=True), temperature=1.0, max_tokens=100, seed=3)
    outputs = engine.generate(PROMPTS * 4, params, use_tqdm=False)
    finished = [o for o in outputs if o.finish_reason == "stop"]
    assert finished
    assert all(isinstance(json.loads(o.text), dict) for o in finished)
    assert all(o.text.startswith("{") for o in outputs)


def test_the_mask_leaves_unconstrained_rows_of_the_same_batch_alone(engine: LLMEngine) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = engine.generate(["Hello"], plain, use_tqdm=False)[0].token_ids
    mixed = engine.generate(
        ["The river", "Hello"],
        [_params(StructuredOutputs(regex="[0-9]+"), temperature=0.0), plain],
        use_tqdm=False,
    )
    assert mixed[1].token_ids == alone
    assert re.fullmatch("[0-9]+", mixed[0].text)


# --- bad specs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"regex": "a(("}, "invalid regex"),
        ({"json": {"type": "objectx"}}, "invalid JSON schema"),
        ({"json": {"type": "object", "properties": 5}}, "invalid JSON schema"),
    ],
)
def test_an_invalid_regex_or_schema_is_rejected_with_the_problem_named(
    engine: LLMEngine, spec: dict, message: str
) -> None:
    with pytest.raises(RequestRejected, match=message) as error:
        engine.add_request("bad", "Hello", _params(StructuredOutputs(**spec)))
    assert error.value.code == "invalid_structured_output"
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"choice": ["a"], "regex": "a"},
        {"choice": []},
        {"choice": ["a", "a"]},
        {"choice": ["a", ""]},
        {"json": "{not json"},
        {"json": [1, 2]},
    ],
)
def test_a_spec_needs_exactly_one_well_formed_constraint(fields: dict) -> None:
    with pytest.raises(ValueError):
        StructuredOutputs(**fields)
