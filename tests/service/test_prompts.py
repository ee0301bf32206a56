"""Prompt and sampling fields that translate honours: chat template fields, truncation, defaults, logprob bytes."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from transformers import AutoTokenizer

from engine import OutputLogprob
from schemas.batch import CHAT_URL, COMPLETIONS_URL, BatchRequestLine
from schemas.openai import ChatCompletionRequest, CompletionRequest
from service.logprobs import chat_logprobs, token_bytes
from service.translate import TranslationError, to_engine_request

# a template that shows every message field and template variable it is given
SHOW_ALL = (
    "{% for m in messages %}[{{ m.role }}|{{ m.name }}|{{ m.tool_call_id }}|"
    "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}]"
    "{{ m.content }}{% endfor %}{% if documents %}docs={{ documents | length }}{% endif %}"
    "{% if add_generation_prompt %}<gen>{% endif %}{% if enable_thinking %}<think>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _chat(**body) -> BatchRequestLine:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return BatchRequestLine(custom_id="c", url=CHAT_URL, body=msgspec.convert(body, ChatCompletionRequest))


def _completion(prompt="The river is cold", **body) -> BatchRequestLine:
    body = msgspec.convert({"prompt": prompt, **body}, CompletionRequest)
    return BatchRequestLine(custom_id="c", url=COMPLETIONS_URL, body=body)


def _text(job: BatchRequestLine, tokenizer) -> str:
    return tokenizer.decode(to_engine_request(job, tokenizer, 16).prompt_token_ids)


def test_add_generation_prompt_false_leaves_the_assistant_turn_unopened(tokenizer) -> None:
    assert _text(_chat(), tokenizer).endswith("<|assistant|>\n")
    assert not _text(_chat(add_generation_prompt=False), tokenizer).endswith("<|assistant|>\n")


def test_continue_final_message_leaves_the_last_message_open(tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, the"}]
    text = _text(
        _chat(messages=messages, add_generation_prompt=False, continue_final_message=True), tokenizer
    )
    assert text.endswith("Well, the")  # no EOS after it: the model goes on from here


def test_continue_final_message_with_add_generation_prompt_is_an_invalid_request(tokenizer) -> None:
    with pytest.raises(TranslationError) as info:
        to_engine_request(_chat(continue_final_message=True), tokenizer, 16)
    assert (info.value.code, info.value.param) == ("invalid_request", "continue_final_message")


def test_message_name_tool_calls_and_tool_call_id_reach_the_template(tokenizer) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "user", "content": "weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "cold", "tool_call_id": "call_1"},
    ]
    text = _text(_chat(messages=messages, chat_template=SHOW_ALL), tokenizer)
    assert "[user|ann||]weather?" in text
    assert "[assistant|||weather(Oslo)]" in text
    assert "[tool||call_1|]cold" in text


def test_chat_template_kwargs_and_documents_reach_the_template(tokenizer) -> None:
    job = _chat(
        chat_template=SHOW_ALL, chat_template_kwargs={"enable_thinking": True}, documents=[{"text": "a"}]
    )
    assert _text(job, tokenizer).endswith("docs=1<gen><think>")


def test_qwen3_enable_thinking_false_closes_an_empty_think_block(tokenizer) -> None:
    # The generation-prompt tail of Qwen3's own chat template
    qwen3 = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
        "{% endif %}"
    )
    thinking = _text(_chat(chat_template=qwen3), tokenizer)
    not_thinking = _text(
        _chat(chat_template=qwen3, chat_template_kwargs={"enable_thinking": False}), tokenizer
    )
    assert thinking.endswith("<|im_start|>assistant\n")
    assert not_thinking == thinking + "<think>\n\n</think>\n\n"


def test_chat_template_kwargs_may_not_override_a_request_field(tokenizer) -> None:
    with pytest.raises(TranslationError) as info:
        to_engine_request(_chat(chat_template_kwargs={"add_generation_prompt": False}), tokenizer, 16)
    assert info.value.param == "chat_template_kwargs"


def test_truncate_prompt_tokens_keeps_the_last_tokens(tokenizer) -> None:
    ids = to_engine_request(_completion(), tokenizer, 16).prompt_token_ids
    assert (
        to_engine_request(_completion(truncate_prompt_tokens=2), tokenizer, 16).prompt_token_ids == ids[-2:]
    )


def test_add_special_tokens_false_leaves_bos_out_of_a_completion_prompt(tokenizer) -> None:
    ids = to_engine_request(_completion(add_special_tokens=False), tokenizer, 16).prompt_token_ids
    assert ids == tokenizer.encode("The river is cold", add_special_tokens=False)


def test_generation_config_defaults_apply_where_the_job_sets_nothing(tokenizer) -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 40}
    params = to_engine_request(_completion(), tokenizer, 16, defaults).params
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    assert params.max_tokens == 40
    own = to_engine_request(_completion(temperature=0, top_k=0, max_tokens=3), tokenizer, 16, defaults).params
    assert (own.temperature, own.top_k, own.max_tokens) == (0, -1, 3)


@pytest.mark.parametrize("field", ["logit_bias", "min_tokens", "repetition_penalty"])
def test_decoding_fields_on_a_greedy_choice_are_refused_by_name(tokenizer, field) -> None:
    value = {"logit_bias": {"5": 1}, "min_tokens": 2, "repetition_penalty": 1.2}[field]
    job = _chat(guided_choice=["a", "b"], temperature=0, **{field: value})
    with pytest.raises(TranslationError) as info:
        to_engine_request(job, tokenizer, 16)
    assert (info.value.code, info.value.param) == ("unsupported_parameter", field)


def test_a_greedy_choice_is_not_refused_for_a_default_of_the_checkpoints(tokenizer) -> None:
    """Issue 30, defect 3: Qwen2.5-Instruct's generation_config.json sets repetition_penalty 1.05."""
    job = _chat(guided_choice=["a", "b"], temperature=0)
    params = to_engine_request(job, tokenizer, 16, {"repetition_penalty": 1.05}).params
    assert params.structured_outputs.choice == ["a", "b"]


def test_echo_with_logprobs_is_refused_by_name(tokenizer) -> None:
    with pytest.raises(TranslationError) as info:
        to_engine_request(_completion(echo=True, logprobs=1), tokenizer, 16)
    assert info.value.param == "echo"


def test_logprob_bytes_are_the_tokens_own_bytes_even_for_half_a_character(tokenizer) -> None:
    ids = tokenizer.encode("\u20ac", add_special_tokens=False)  # the euro sign: 3 UTF-8 bytes
    assert len(ids) > 1, "the tiny tokenizer splits it, which is what this test needs"
    assert [b for tid in ids for b in token_bytes(tokenizer, tid)] == list("\u20ac".encode())
    content = chat_logprobs([OutputLogprob(ids[0], -0.5, [(ids[0], -0.5)])], tokenizer).content[0]
    assert content.token == "\ufffd"  # half a character decodes to the replacement character...
    assert content.bytes == token_bytes(tokenizer, ids[0]) != list("\ufffd".encode())  # ...its bytes do not
    assert content.top_logprobs[0].bytes == content.bytes


def test_logprob_bytes_of_plain_and_special_tokens(tokenizer) -> None:
    (river,) = tokenizer.encode(" river", add_special_tokens=False)
    assert token_bytes(tokenizer, river) == list(b" river")
    assert token_bytes(tokenizer, tokenizer.eos_token_id) == list(tokenizer.eos_token.encode())
