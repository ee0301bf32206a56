"""translate: wire request -> (prompt ids, SamplingParams); engine output -> wire result line."""

import json
import time
from pathlib import Path

import msgspec
import pytest
from transformers import AutoTokenizer

from engine import RequestMetrics, RequestOutput, SamplingParams, StructuredOutputs
from engine.async_engine import AsyncLLMEngine
from schemas.batch import CHAT_URL, COMPLETIONS_URL, BatchRequestLine
from schemas.codec import decode_result, encode_result
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.responses import ChatCompletion, TextCompletion
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.translate import (
    TranslationError,
    to_engine_request,
    to_error_line,
    to_failure_line,
    to_result_line,
)

DEFAULT_MAX = 77


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _chat(**body) -> BatchRequestLine:
    body.setdefault("messages", [{"role": "user", "content": "hi there"}])
    return BatchRequestLine(
        custom_id="c-chat", url=CHAT_URL, body=msgspec.convert(body, ChatCompletionRequest)
    )


def _completion(prompt="The river", **body) -> BatchRequestLine:
    body = msgspec.convert({"prompt": prompt, **body}, CompletionRequest)
    return BatchRequestLine(custom_id="c-cmpl", url=COMPLETIONS_URL, body=body)


def _params(job: BatchRequestLine, tokenizer) -> SamplingParams:
    return to_engine_request(job, tokenizer, DEFAULT_MAX).params


# --- prompts ------------------------------------------------------------------------------


def test_chat_job_becomes_the_chat_template_rendering_with_one_bos(tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    request = to_engine_request(_chat(messages=messages), tokenizer, DEFAULT_MAX)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert request.prompt_token_ids == expected
    assert request.prompt_token_ids[0] == tokenizer.bos_token_id
    assert request.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(request.prompt_token_ids).endswith("<|assistant|>\n")


def test_chat_content_text_parts_render_joined_with_newlines(tokenizer) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    as_parts = to_engine_request(_chat(messages=[{"role": "user", "content": parts}]), tokenizer, DEFAULT_MAX)
    as_text = to_engine_request(
        _chat(messages=[{"role": "user", "content": "hi\nthere"}]), tokenizer, DEFAULT_MAX
    )
    assert as_parts.prompt_token_ids == as_text.prompt_token_ids


def test_a_non_text_content_part_is_refused_by_its_position(tokenizer) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(TranslationError) as info:
        to_engine_request(_chat(messages=[{"role": "user", "content": parts}]), tokenizer, DEFAULT_MAX)
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "messages[0].content[1]")


def test_chat_role_the_template_rejects_is_an_invalid_request(tokenizer) -> None:
    with pytest.raises(TranslationError) as info:
        to_engine_request(_chat(messages=[{"role": "tool", "content": "x"}]), tokenizer, DEFAULT_MAX)
    assert info.value.code == "invalid_request"
    assert info.value.status_code == 400


def test_completion_string_prompt_is_tokenized_with_bos(tokenizer) -> None:
    request = to_engine_request(_completion("The river is cold"), tokenizer, DEFAULT_MAX)
    assert request.prompt_token_ids == tokenizer("The river is cold").input_ids
    assert request.prompt_token_ids[0] == tokenizer.bos_token_id


def test_completion_token_id_prompt_is_passed_through_unchanged(tokenizer) -> None:
    request = to_engine_request(_completion([7, 8, 9]), tokenizer, DEFAULT_MAX)
    assert request.prompt_token_ids == [7, 8, 9]


# --- sampling parameters ------------------------------------------------------------------


def test_unset_sampling_fields_give_engine_defaults(tokenizer) -> None:
    params = _params(_completion(), tokenizer)
    assert params == SamplingParams(max_tokens=DEFAULT_MAX)


def test_temperature_zero_means_greedy(tokenizer) -> None:
    assert _params(_completion(temperature=0.0), tokenizer).is_greedy
    assert not _params(_completion(temperature=0.7), tokenizer).is_greedy


@pytest.mark.parametrize(("top_k", "expected"), [(0, -1), (-1, -1), (None, -1), (5, 5)])
def test_top_k_zero_or_unset_means_no_cut(tokenizer, top_k, expected) -> None:
    assert _params(_completion(top_k=top_k), tokenizer).top_k == expected


@pytest.mark.parametrize(("stop", "expected"), [("END", ["END"]), (["a", "b"], ["a", "b"]), (None, [])])
def test_stop_as_string_or_list_becomes_a_list(tokenizer, stop, expected) -> None:
    assert _params(_chat(stop=stop), tokenizer).stop == expected


def test_all_sampling_fields_map_onto_sampling_params(tokenizer) -> None:
    job = _completion(
        max_tokens=12,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=42,
        stop_token_ids=[2, 5],
        ignore_eos=True,
    )
    assert _params(job, tokenizer) == SamplingParams(
        max_tokens=12,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=42,
        stop_token_ids=[2, 5],
        ignore_eos=True,
    )


def test_max_completion_tokens_is_preferred_over_max_tokens(tokenizer) -> None:
    assert _params(_chat(max_tokens=10, max_completion_tokens=20), tokenizer).max_tokens == 20
    assert _params(_chat(max_tokens=10), tokenizer).max_tokens == 10


def test_default_max_tokens_is_used_when_neither_is_set(tokenizer) -> None:
    assert _params(_chat(), tokenizer).max_tokens == DEFAULT_MAX
    assert to_engine_request(_chat(), tokenizer, 5).params.max_tokens == 5


# --- structured outputs ---------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}


@pytest.mark.parametrize("make", [_chat, _completion], ids=["chat", "completion"])
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputs(choice=["yes", "no"])),
        ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutputs(regex="[0-9]+")),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputs(json=SCHEMA)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputs(json=SCHEMA)),
        ({"structured_outputs": {"json_object": True}}, StructuredOutputs(json_object=True)),
        ({"guided_choice": ["yes", "no"]}, StructuredOutputs(choice=["yes", "no"])),
        ({"guided_regex": "[0-9]+"}, StructuredOutputs(regex="[0-9]+")),
        ({"guided_json": SCHEMA}, StructuredOutputs(json=SCHEMA)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutputs(json=SCHEMA),
        ),
        ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
        ({"response_format": {"type": "text"}}, None),
        ({}, None),
    ],
    ids=[
        "choice",
        "regex",
        "json",
        "json-text",
        "json_object",
        "guided_choice",
        "guided_regex",
        "guided_json",
        "response_format-json_schema",
        "response_format-json_object",
        "response_format-text",
        "none",
    ],
)
def test_each_way_of_asking_for_a_constraint_becomes_the_engines_structured_outputs(
    tokenizer, make, fields, expected
) -> None:
    assert _params(make(**fields), tokenizer).structured_outputs == expected


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"guided_choice": ["a"], "guided_regex": "a"}, "invalid_request", "guided_choice, guided_regex"),
        (
            {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
            "invalid_request",
            "structured_outputs.choice, response_format",
        ),
        ({"structured_outputs": {"regex": "a", "json": {}}}, "invalid_request", "at most one"),
        ({"guided_choice": []}, "invalid_structured_output", "guided_choice: choice must be a non-empty"),
        ({"guided_choice": ["a", "a"]}, "invalid_structured_output", "twice"),
        ({"guided_json": "{not json"}, "invalid_structured_output", "guided_json: json is not a JSON schema"),
        ({"response_format": {"type": "json_schema"}}, "invalid_request", "json_schema"),
        (
            {"structured_outputs": {"grammar": "start: x"}},
            "unsupported_parameter",
            "structured_outputs.grammar",
        ),
    ],
    ids=[
        "two-guided",
        "structured-and-response_format",
        "two-in-one",
        "empty",
        "twice",
        "bad-json",
        "no-schema",
        "grammar",
    ],
)
def test_conflicting_or_malformed_constraints_are_a_400_naming_the_problem(
    tokenizer, fields, code, message
) -> None:
    with pytest.raises(TranslationError) as info:
        to_engine_request(_chat(**fields), tokenizer, DEFAULT_MAX)
    assert info.value.code == code
    assert info.value.status_code == 400
    assert message in info.value.message


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (_chat(), None),
        (_chat(logprobs=True), 0),
        (_chat(logprobs=True, top_logprobs=3), 3),
        (_completion(logprobs=0), 0),
        (_completion(logprobs=5), 5),
    ],
    ids=["none", "chat", "chat-top-3", "completion-0", "completion-5"],
)
def test_logprobs_fields_map_to_the_number_of_alternatives(tokenizer, job, expected) -> None:
    assert _params(job, tokenizer).logprobs == expected


def test_text_response_format_is_accepted(tokenizer) -> None:
    assert _params(_chat(response_format={"type": "text"}), tokenizer).max_tokens == DEFAULT_MAX


def test_choice_probabilities_go_into_the_sluice_extension_and_are_omitted_without_a_choice() -> None:
    output = _output()
    output.choice_probabilities = {"yes": 0.75, "no": 0.25}
    for make in (_chat, _completion):
        obj = json.loads(encode_result(to_result_line(make(), output, "m", time.time())))
        assert obj["response"]["body"]["sluice"]["choice_probabilities"] == {"yes": 0.75, "no": 0.25}
    plain = json.loads(encode_result(to_result_line(_chat(), _output(), "m", time.time())))
    assert "choice_probabilities" not in plain["response"]["body"]["sluice"]


# --- results ------------------------------------------------------------------------------


def _output(prompt_len: int = 4, tokens=(11, 12, 2), text="ab", finish_reason="stop") -> RequestOutput:
    now = time.time()
    return RequestOutput(
        request_id="r1",
        prompt_token_ids=list(range(1, prompt_len + 1)),
        token_ids=list(tokens),
        text=text,
        finish_reason=finish_reason,
        metrics=RequestMetrics(arrival_time=now - 0.5, first_token_time=now - 0.4, finished_time=now),
        stop_reason=2,
    )


def test_chat_result_line_is_a_200_chat_completion_with_usage_and_timings() -> None:
    output = _output()
    line = to_result_line(_chat(), output, "tiny", enqueued_time=output.metrics.arrival_time - 0.25)
    assert (line.custom_id, line.error, line.is_error) == ("c-chat", None, False)
    assert line.response.status_code == 200
    body = line.response.body
    assert isinstance(body, ChatCompletion)
    assert body.model == "tiny"
    assert body.choices[0].message.content == "ab"
    assert body.choices[0].finish_reason == "stop"
    usage = body.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 3, 7)
    timings = body.sluice
    assert timings.queue_ms == pytest.approx(250, abs=1)
    assert timings.ttft_ms == pytest.approx(100, abs=1)
    assert timings.total_ms == pytest.approx(750, abs=1)


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_completion_result_line_passes_text_and_finish_reason_through(finish_reason: str) -> None:
    output = _output(prompt_len=2, tokens=(5, 6, 7, 8), text=" world", finish_reason=finish_reason)
    line = to_result_line(_completion(), output, "m", enqueued_time=output.metrics.arrival_time)
    body = line.response.body
    assert isinstance(body, TextCompletion)
    assert (body.choices[0].text, body.choices[0].finish_reason) == (" world", finish_reason)
    assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (2, 4, 6)


def test_timings_are_never_negative_even_with_a_clock_skewed_enqueue_time() -> None:
    output = _output()
    line = to_result_line(_chat(), output, "m", enqueued_time=output.metrics.finished_time + 60)
    timings = line.response.body.sluice
    assert timings.queue_ms >= 0 and timings.total_ms >= 0 and timings.ttft_ms >= 0


def test_result_line_ids_are_unique_per_result() -> None:
    output = _output()
    a = to_result_line(_chat(), output, "m", time.time())
    b = to_result_line(_chat(), output, "m", time.time())
    assert a.id != b.id
    assert a.response.request_id != b.response.request_id
    assert a.response.body.id != b.response.body.id


def test_result_line_encodes_as_openai_json_and_round_trips() -> None:
    line = to_result_line(_chat(), _output(), "tiny", time.time())
    data = encode_result(line)
    obj = json.loads(data)
    assert obj["error"] is None
    assert obj["response"]["body"]["object"] == "chat.completion"
    assert obj["response"]["body"]["choices"][0]["message"]["content"] == "ab"
    assert decode_result(data) == line


def test_error_line_is_a_400_with_openais_error_body_and_no_top_level_error() -> None:
    line = to_error_line("c9", "unsupported_parameter", "`suffix` is not supported", param="suffix")
    assert line.custom_id == "c9"
    assert line.is_error
    assert line.error is None  # OpenAI and vLLM keep an HTTP error in the response only
    assert line.response.status_code == 400
    detail = line.response.body.error
    assert (detail.code, detail.type, detail.param, detail.message) == (
        "unsupported_parameter",
        "invalid_request_error",
        "suffix",
        "`suffix` is not supported",
    )
    assert (line.failure.code, line.failure.message) == ("unsupported_parameter", "`suffix` is not supported")
    assert decode_result(encode_result(line)) == line


def test_error_line_with_status_500_is_a_server_error() -> None:
    line = to_error_line("c9", "engine_failed", "boom", status_code=500)
    assert line.response.status_code == 500
    assert line.response.body.error.type == "server_error"
    assert line.response.body.error.code == line.failure.code == "engine_failed"


def test_failure_line_has_no_response_and_the_top_level_error() -> None:
    line = to_failure_line("c9", "deadline_exceeded", "too late")
    assert line.response is None
    assert (line.error.code, line.error.message) == ("deadline_exceeded", "too late")
    assert line.is_error
    assert decode_result(encode_result(line)) == line


def test_an_aborted_output_becomes_a_500_error_not_a_200_with_finish_reason_abort() -> None:
    line = to_result_line(_completion(), _output(finish_reason="abort"), "m", time.time())
    assert line.response.status_code == 500
    assert line.failure.code == "engine_error"


# --- ids and the serving configuration, through the JobHandler -------------------------------


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=4),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(url: str, body: dict, **kwargs):
        job = json.dumps({"custom_id": "j", "url": url, "body": body}).encode()
        return await handler.handle(job, [], int(time.time() * 1000), "jobs/0/1", **kwargs)

    yield run
    await engine.stop()


async def test_chat_and_completion_bodies_carry_one_stable_system_fingerprint(handle) -> None:
    """Issue 30, defect 8: OpenAI's `system_fingerprint` was missing."""
    chat = await handle(CHAT_URL, {"messages": [{"role": "user", "content": "hi"}]})
    completion = await handle(COMPLETIONS_URL, {"prompt": "The river"})
    fingerprints = {
        chat.result.response.body.system_fingerprint,
        completion.result.response.body.system_fingerprint,
    }
    (fingerprint,) = fingerprints
    assert fingerprint.startswith("fp_") and len(fingerprint) == len("fp_") + 12
    assert json.loads(encode_result(chat.result))["response"]["body"]["system_fingerprint"] == fingerprint


async def test_the_request_id_is_the_jobs_engine_request_id_and_a_given_one_is_kept(handle) -> None:
    """Issue 30, defect 8: `request_id` was a random `req-<hex>` that matched nothing else."""
    outcome = await handle(COMPLETIONS_URL, {"prompt": "The river"})
    request_id = outcome.result.response.request_id
    assert request_id.startswith("req_") and request_id == outcome.request_id
    assert outcome.output.request_id == request_id  # the engine ran it under this id
    refused = await handle(COMPLETIONS_URL, {"prompt": "The river", "stream": True})
    assert refused.result.response.request_id == refused.request_id != request_id
    given = await handle(COMPLETIONS_URL, {"prompt": "The river"}, request_id="req_from_the_span")
    assert given.result.response.request_id == given.output.request_id == "req_from_the_span"
