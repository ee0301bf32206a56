"""LLMEngine on the tiny checkpoint, on CPU in float32, against Transformers' own generate()."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, EngineConfigError, LLMEngine, ModelLoadError, RequestRejected, SamplingParams
from engine.loader.checkpoint import check_checkpoint_folder

PROMPTS = ["Hello", "The river", "The river is cold today, and many people went home"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint)))


@pytest.fixture(scope="module")
def short_engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=32))


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    return outputs


# --- numerics ---------------------------------------------------------------------------


def test_greedy_generate_matches_transformers_token_for_token(
    engine: LLMEngine, tiny_checkpoint: Path
) -> None:
    n = 16
    outputs = engine.generate(PROMPTS, _greedy(n))
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    assert len({len(o.prompt_token_ids) for o in outputs}) == len(PROMPTS)  # three different lengths
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        input_ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        assert output.prompt_token_ids == input_ids[0].tolist()
        with torch.no_grad():
            # Both sides stop at EOS (id 2) the same way; HF keeps the EOS in its output, as we do.
            expected = reference.generate(input_ids, do_sample=False, max_new_tokens=n)[
                0, input_ids.shape[1] :
            ]
        assert output.token_ids == expected.tolist(), prompt


def test_output_text_is_the_decoded_tokens(engine: LLMEngine) -> None:
    [output] = engine.generate(["The river"], _greedy(10))
    assert output.text == engine.tokenizer.decode(output.token_ids, skip_special_tokens=True)


def test_same_seed_gives_same_tokens_alone_or_in_a_batch(engine: LLMEngine) -> None:
    tok = engine.tokenizer.encode
    params = SamplingParams(temperature=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = _run(engine, {"a": (tok("The river"), params)})["a"]
    batch = _run(
        engine,
        {
            "x": (tok("Hello"), SamplingParams(temperature=0.9, max_tokens=7, seed=1)),
            "a": (tok("The river"), params),
            "y": (tok("The river is cold today"), SamplingParams(temperature=1.0, max_tokens=20)),
        },
    )["a"]
    assert len(alone.token_ids) == 20
    assert batch.token_ids == alone.token_ids


def test_different_seeds_give_different_tokens(engine: LLMEngine) -> None:
    prompt = engine.tokenizer.encode("The river")
    outputs = _run(
        engine,
        {
            f"s{seed}": (prompt, SamplingParams(temperature=0.9, max_tokens=20, seed=seed, ignore_eos=True))
            for seed in (1, 2)
        },
    )
    assert outputs["s1"].token_ids != outputs["s2"].token_ids


# --- finishing ----------------------------------------------------------------------------


def test_max_tokens_caps_the_output_with_finish_reason_length(engine: LLMEngine) -> None:
    [output] = engine.generate(["Hello"], _greedy(5, ignore_eos=True))
    assert len(output.token_ids) == 5
    assert (output.finish_reason, output.stop_reason) == ("length", None)
    assert output.is_finished


@pytest.mark.parametrize("at", [5, 70])  # 70: far past the tail window the check decodes
def test_stop_string_ends_generation_and_is_cut_from_the_text(engine: LLMEngine, at: int) -> None:
    n = at + 15
    [free] = engine.generate(["The river"], _greedy(n, ignore_eos=True))
    stop = engine.tokenizer.decode(free.token_ids[at : at + 2], skip_special_tokens=True)
    assert len(stop) >= 2
    cut = free.text.find(stop)

    [output] = engine.generate(["The river"], _greedy(n, ignore_eos=True, stop=[stop]))
    assert (output.finish_reason, output.stop_reason) == ("stop", stop)
    assert stop not in output.text
    assert output.text == free.text[:cut]
    assert len(output.token_ids) < n
    assert output.token_ids == free.token_ids[: len(output.token_ids)]


def test_stop_token_id_ends_generation_and_is_the_stop_reason(engine: LLMEngine) -> None:
    [free] = engine.generate(["The river"], _greedy(20, ignore_eos=True))
    index = next(i for i in range(3, 20) if free.token_ids[i] not in free.token_ids[:i])
    stop_id = free.token_ids[index]

    [output] = engine.generate(["The river"], _greedy(20, ignore_eos=True, stop_token_ids=[stop_id]))
    assert (output.finish_reason, output.stop_reason) == ("stop", stop_id)
    assert output.token_ids == free.token_ids[: index + 1]  # the stop token is kept in token_ids
    assert output.text == engine.tokenizer.decode(free.token_ids[:index], skip_special_tokens=True)


def test_abort_reports_the_request_on_the_next_step_and_others_continue(engine: LLMEngine) -> None:
    tok = engine.tokenizer.encode
    engine.add_request("keep", tok("Hello"), _greedy(5, ignore_eos=True))
    engine.add_request("drop", tok("The river"), _greedy(5, ignore_eos=True))
    assert engine.step() == []
    assert engine.abort("drop") is True
    assert engine.abort("drop") is False
    assert engine.abort("never-added") is False

    finished = {o.request_id: o for o in engine.step()}
    assert set(finished) == {"drop"}
    assert finished["drop"].finish_reason == "abort"
    assert len(finished["drop"].token_ids) == 1
    assert finished["drop"].metrics.finished_time is not None

    rest = {}
    while engine.has_unfinished_requests():
        rest.update((o.request_id, o) for o in engine.step())
    assert set(rest) == {"keep"}
    assert (rest["keep"].finish_reason, len(rest["keep"].token_ids)) == ("length", 5)
    assert not engine.has_unfinished_requests()


def test_a_request_aborted_without_a_report_frees_its_blocks_and_is_never_reported(engine: LLMEngine) -> None:
    free = engine.block_manager.num_free_blocks
    engine.add_request("answered-elsewhere", engine.tokenizer.encode("The river"), _greedy(5))
    assert engine.step() == []
    assert engine.abort("answered-elsewhere", report=False) is True
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == free
    assert engine.step() == []


def test_metrics_are_ordered_arrival_first_token_finished(engine: LLMEngine) -> None:
    [output] = engine.generate(["Hello"], _greedy(4))
    m = output.metrics
    assert m.first_token_time is not None and m.finished_time is not None
    assert m.arrival_time <= m.first_token_time <= m.finished_time


# --- rejection --------------------------------------------------------------------------


def test_empty_prompt_is_rejected(engine: LLMEngine) -> None:
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("empty", [], _greedy(1))
    assert not engine.has_unfinished_requests()


def test_prompt_of_max_model_len_tokens_is_rejected(short_engine: LLMEngine) -> None:
    assert short_engine.max_model_len == 32
    with pytest.raises(RequestRejected, match="32 tokens"):
        short_engine.add_request("long", [5] * 32, _greedy(1))
    assert not short_engine.has_unfinished_requests()


def test_prompt_one_below_max_model_len_gets_exactly_one_token(short_engine: LLMEngine) -> None:
    outputs = _run(short_engine, {"fits": ([5] * 31, _greedy(10, ignore_eos=True))})
    assert (len(outputs["fits"].token_ids), outputs["fits"].finish_reason) == (1, "length")


@pytest.mark.parametrize("bad", [-1, 4096, 10**9])
def test_token_ids_outside_the_vocabulary_are_rejected(engine: LLMEngine, bad: int) -> None:
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        engine.add_request("bad", [1, 5, bad], _greedy(1))
    assert not engine.has_unfinished_requests()


def test_duplicate_request_id_is_rejected_and_the_first_keeps_running(engine: LLMEngine) -> None:
    engine.add_request("dup", [1, 5, 6], _greedy(3, ignore_eos=True))
    with pytest.raises(RequestRejected, match="dup"):
        engine.add_request("dup", [1, 7], _greedy(3))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs["dup"].prompt_token_ids == [1, 5, 6]


# --- loading ------------------------------------------------------------------------------


def _copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def test_folder_without_config_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        check_checkpoint_folder(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError) as info:
        check_checkpoint_folder(tmp_path)
    assert "GPT2LMHeadModel" in str(info.value)
    assert str(tmp_path / "config.json") in str(info.value)


def test_invalid_json_in_config_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON") as info:
        check_checkpoint_folder(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_folder_without_safetensors_names_the_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="safetensors") as info:
        LLMEngine(EngineConfig(dtype="float32", model=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


def test_corrupt_safetensors_raises_model_load_error_naming_the_file(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file") as info:
        LLMEngine(EngineConfig(dtype="float32", model=str(folder)))
    assert str(folder / "model.safetensors") in str(info.value)


def test_check_checkpoint_folder_returns_the_config(tiny_checkpoint: Path) -> None:
    config = check_checkpoint_folder(tiny_checkpoint)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 4096


def test_engine_config_rejects_an_unknown_dtype(tiny_checkpoint: Path) -> None:
    with pytest.raises(EngineConfigError, match="float8"):
        EngineConfig(model=str(tiny_checkpoint), dtype="float8")


def test_engine_rejects_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=r"model folder .*nowhere.* does not exist"):
        LLMEngine(EngineConfig(dtype="float32", model=str(missing)))


def test_engine_rejects_an_empty_model_option() -> None:
    with pytest.raises(ModelLoadError, match="`model` is empty"):
        LLMEngine(EngineConfig())
