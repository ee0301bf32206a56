"""An engine error that belongs to one job's data fails that job alone, through the service and the broker."""

from __future__ import annotations

import json

import pytest

from schemas.codec import decode_result

pytestmark = pytest.mark.kafka

MAX_TOKENS = {"three": 3, "five": 5, "seven": 7}  # the "five" job's output is the one that fails


def _jobs(run: str) -> list[tuple[bytes, bytes, list]]:
    jobs = []
    for name, max_tokens in MAX_TOKENS.items():
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        job = {"custom_id": f"{run}-{name}", "url": "/v1/completions", "body": body}
        jobs.append((job["custom_id"].encode(), json.dumps(job).encode(), []))
    return jobs


async def test_a_job_whose_output_cannot_be_decoded_gets_an_error_result_and_the_others_their_text(
    kafka, service_config, run_service, tiny_engine, monkeypatch
):
    decode = tiny_engine.tokenizer.decode

    def decode_failing_for_five_tokens(token_ids, *args, **kwargs):
        if len(token_ids) == 5:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return decode(token_ids, *args, **kwargs)

    jobs_topic, results_topic = service_config.jobs_topics[0], service_config.results_topic
    async with run_service(service_config):
        await kafka.post(jobs_topic, _jobs("clean"))
        await kafka.read(results_topic, 3)
        monkeypatch.setattr(tiny_engine.tokenizer, "decode", decode_failing_for_five_tokens)
        await kafka.post(jobs_topic, _jobs("faulty"))  # posted together: admitted as one batch
        records = await kafka.read(results_topic, 6)
    results = {r.key.decode(): decode_result(r.value).response for r in records}

    failed = results["faulty-five"]
    assert failed.status_code == 500 and failed.body.error.code == "engine_error"
    assert failed.body.error.message.startswith("RequestFailed: the engine could not process the output")
    assert "UnicodeDecodeError" in failed.body.error.message
    for name in ("three", "seven"):
        response, clean = results[f"faulty-{name}"], results[f"clean-{name}"]
        assert response.status_code == 200
        assert response.body.choices[0].text == clean.body.choices[0].text
        assert response.body.choices[0].finish_reason == "length"
        assert response.body.usage.completion_tokens == MAX_TOKENS[name]
    assert results["clean-five"].status_code == 200  # the same job, before the decode broke
