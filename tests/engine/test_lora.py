"""Multi-LoRA: greedy tokens equal Transformers + PEFT for every adapter, in batches that mix
adapters and the base model; adapters that cannot be served are refused at start-up by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import EngineConfig, LLMEngine, LoRAError, SamplingParams
from engine.config import EngineConfigError
from engine.core.input_processor import RequestRejected
from engine.demo.checkpoints import ensure_checkpoint
from tests.engine.lora_adapters import ADAPTERS, build_adapter, mixed_batch, peft_greedy, random_prompts
from tests.engine.transformers_greedy import transformers_greedy

MAX_TOKENS = 8


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3"])
def family(request, model_cache, tmp_path_factory):
    return build_family(request.param, model_cache, tmp_path_factory)


def build_family(preset: str, model_cache, tmp_path_factory):
    """(checkpoint, adapter folders, prompts, reference tokens by adapter name; None: the base)."""
    checkpoint = ensure_checkpoint(model_cache, preset=preset)
    prompts = random_prompts(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    folders, reference = {}, {None: transformers_greedy(checkpoint, torch.float32, prompts, MAX_TOKENS)}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        folders[name] = tmp_path_factory.mktemp(f"{preset}-{name}")
        build_adapter(checkpoint, folders[name], seed, **options)
        reference[name] = peft_greedy(checkpoint, folders[name], prompts, MAX_TOKENS)
        assert reference[name] != reference[None]  # the adapter changes the output
    return checkpoint, folders, prompts, reference


def _engine(checkpoint, folders, **options) -> LLMEngine:
    adapters = {name: str(folder) for name, folder in folders.items()}
    return LLMEngine(EngineConfig(dtype="float32", model=str(checkpoint), lora_adapters=adapters, **options))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_loras": 1, "max_num_batched_tokens": 32}, id="one-slot-small-chunks"),
        pytest.param({"max_loras": 2, "num_kv_blocks": 40, "block_size": 4}, id="two-slots-preemption"),
    ],
)
def test_greedy_tokens_match_peft_in_a_batch_mixing_adapters_and_the_base(family, options):
    checkpoint, folders, prompts, reference = family
    engine = _engine(checkpoint, folders, **options)
    batch, params, owners = mixed_batch(prompts, [None, *ADAPTERS], MAX_TOKENS)
    outputs = engine.generate(batch, params, use_tqdm=False)
    got = {owner: o.token_ids for owner, o in zip(owners, outputs, strict=True)}
    assert got == {(name, i): reference[name][i] for name, i in owners}
    if "num_kv_blocks" in options:
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_cached_prefix_of_one_adapter_never_serves_another(family):
    checkpoint, folders, prompts, reference = family
    engine = _engine(checkpoint, folders)
    prompt = prompts[2]  # 40 tokens: two full blocks
    for name in [None, "all", "attn", None, "all"]:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, lora_name=name)
        [output] = engine.generate([prompt], params, use_tqdm=False)
        assert output.token_ids == reference[name][2]
    assert engine.block_manager.stats.hit_tokens == 2 * 32  # the repeats of None and "all" only


def test_stats_count_the_adapters_each_step_found_in_a_slot_and_those_it_loaded(family):
    checkpoint, folders, prompts, reference = family
    engine = _engine(checkpoint, folders, max_loras=1)
    for name in ["all", "all", "attn", "all"]:  # one slot: "attn" evicts "all", which loads again
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, lora_name=name)
        [output] = engine.generate([prompts[0]], params, use_tqdm=False)
        assert output.token_ids == reference[name][0]
    stats = engine.stats()
    assert stats.lora_slot_loads == 3 and stats.lora_load_seconds > 0
    assert stats.lora_slot_hits == stats.steps.num_steps - 3  # every other step found its adapter


def test_an_unknown_adapter_name_is_rejected(family):
    checkpoint, folders, prompts, _ = family
    engine = _engine(checkpoint, {"all": folders["all"]})
    with pytest.raises(RequestRejected, match="unknown LoRA adapter 'nope'") as raised:
        engine.add_request("r", prompts[0], SamplingParams(lora_name="nope"))
    assert raised.value.code == "model_not_found"


def test_a_step_never_holds_more_adapters_than_slots(family):
    checkpoint, folders, prompts, reference = family
    engine = _engine(checkpoint, folders, max_loras=1)
    names = ["all", "attn", "mlp", None, "all"]
    for i, name in enumerate(names):
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, lora_name=name)
        engine.add_request(f"r{i}", prompts[i], params)
    outputs, num_steps = {}, 0
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o.token_ids) for o in engine.step())
        assert len({s.lora_name for s in engine.scheduler.running} - {None}) <= 1
        num_steps += 1
    assert num_steps > 2 * MAX_TOKENS  # the adapters took turns
    assert outputs == {f"r{i}": reference[name][i] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def tiny_adapter(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-adapter")
    build_adapter(tiny_checkpoint, folder, 0, r=4, target_modules=["q_proj", "down_proj"])
    return folder


def _broken_copy(folder, tmp_path, config_changes=None, tensors=None):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    if config_changes:
        config = json.loads((copy / "adapter_config.json").read_text())
        config.update(config_changes)
        (copy / "adapter_config.json").write_text(json.dumps(config))
    if tensors:
        weights = load_file(copy / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, copy / "adapter_model.safetensors")
    return copy


@pytest.mark.parametrize(
    "config_changes, tensors, message",
    [
        ({"r": 32}, None, r"adapter_config.json: rank r=32 is above max_lora_rank=16"),
        ({"modules_to_save": ["lm_head"]}, None, r"adapter_config.json: modules_to_save \['lm_head'\]"),
        ({"target_modules": ["q_proj", "lm_head"]}, None, r"target_modules \['lm_head'\] are not supported"),
        (
            None,
            lambda w: w.update(
                {k: torch.zeros(4, 7) for k in w if "q_proj.lora_A" in k and "layers.0." in k}
            ),
            r"adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has "
            r"shape \(4, 7\)",
        ),
        (
            None,
            lambda w: w.update(
                {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}
            ),
            r"up_proj.lora_B.weight is missing",
        ),
        (
            None,
            lambda w: w.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
            r"tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA A or B weight",
        ),
        (
            None,
            lambda w: w.update(
                {
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(1, 4),
                }
            ),
            r"layers.9.self_attn.q_proj: the model has no such layer",
        ),
    ],
)
def test_an_adapter_that_cannot_be_served_is_refused_at_start_up_by_file_and_tensor(
    tiny_checkpoint, tiny_adapter, tmp_path, config_changes, tensors, message
):
    broken = _broken_copy(tiny_adapter, tmp_path, config_changes, tensors)
    with pytest.raises(LoRAError, match=message):
        LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), lora_adapters={"x": str(broken)}))


def test_adapters_are_accepted_with_tensor_and_pipeline_parallelism():
    # each rank holds its part of every adapter: tests/engine/test_lora_parallel.py
    config = EngineConfig(lora_adapters={"a": "/x"}, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert config.lora_adapters == {"a": "/x"}


def test_lora_adapters_that_are_not_a_name_to_folder_map_are_refused_by_name():
    with pytest.raises(EngineConfigError, match="lora_adapters must map adapter names to folders"):
        EngineConfig(lora_adapters={"a": ""})
