"""A checkpoint's facts are read once per engine start and handed down to every rank.

config.json is opened once while an engine starts (the tokenizer and the model's transformers
config are built from that one read); a parallel engine's workers get rank 0's CheckpointInfo
and quantisation plan in their spawn arguments and open no config.json of their own.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
from pathlib import Path

import pytest
from transformers import AutoConfig

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.demo.checkpoints import build_weightless_checkpoint, ensure_checkpoint
from engine.demo.presets import PRESETS
from engine.executor import executor as executor_module
from engine.executor.runtime import ModelSpec
from engine.executor.worker import run_worker
from engine.loader.checkpoint import CheckpointInfo, read_checkpoint
from engine.models import MODEL_REGISTRY
from engine.models.base import DecoderForCausalLM

_COUNT_FILE = "SLUICE_TEST_CONFIG_READS"  # where a counting worker writes how often it opened config.json


@pytest.fixture
def config_json_opens(monkeypatch) -> list[str]:
    """Every opening of a file named config.json in this process, from here on (transformers'
    `open` and pathlib's `io.open` alike)."""
    opened: list[str] = []
    _count_opens(opened, monkeypatch.setattr)
    return opened


def test_an_engine_start_opens_config_json_once(tiny_checkpoint, config_json_opens):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=64))
    assert config_json_opens == [str(tiny_checkpoint / "config.json")]
    assert engine.checkpoint.folder == str(tiny_checkpoint)
    (output,) = engine.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(output.token_ids) == 2


def test_the_facts_travel_to_a_worker_without_the_tokenizer(tiny_checkpoint):
    checkpoint, tokenizer = read_checkpoint(tiny_checkpoint)
    assert pickle.loads(pickle.dumps(checkpoint)) == checkpoint  # spawn arguments are pickled
    assert not any(value is tokenizer for value in vars_of(checkpoint))
    assert tokenizer.eos_token_id in checkpoint.eos_token_ids
    assert checkpoint.vocab_size == checkpoint.hf_config["vocab_size"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_transformers_config_built_from_the_one_read_is_the_one_transformers_reads(tmp_path, preset):
    folder = build_weightless_checkpoint(tmp_path / preset, preset)  # the facts, without gpu-1b's 4 GB
    checkpoint, _ = read_checkpoint(folder)
    expected = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    assert type(checkpoint.pretrained_config()) is type(expected)
    assert checkpoint.pretrained_config().to_dict() == expected.to_dict()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma3-mm"])
def test_a_weightless_folder_holds_the_files_its_checkpoint_holds(model_cache, tmp_path, preset):
    weightless = build_weightless_checkpoint(tmp_path, preset)
    built = ensure_checkpoint(model_cache, preset=preset)
    for name in ("config.json", "tokenizer.json"):
        assert (weightless / name).read_bytes() == (built / name).read_bytes(), name


def test_every_family_declares_the_loader_s_hooks_on_the_base_class():
    hooks = (
        "packed_modules_mapping",
        "ignored_checkpoint_tensors",
        "checkpoint_prefixes",
        "has_attention_sinks",
        "checkpoint_name",
        "is_other_stage_weight",
        "expert_tensor",
        "expert_sources",
    )
    assert all(hasattr(DecoderForCausalLM, hook) for hook in hooks)
    assert "tie_word_embeddings" in DecoderForCausalLM.__annotations__  # set from the config
    assert all(issubclass(model_class, DecoderForCausalLM) for model_class in MODEL_REGISTRY.values())


@pytest.mark.slow
def test_a_parallel_engine_hands_its_workers_the_facts_and_they_read_no_config(
    tiny_checkpoint, tmp_path, config_json_opens, monkeypatch
):
    spawned: list[tuple] = []
    real_get_context = executor_module.multiprocessing.get_context

    class RecordingContext:
        def __init__(self, method):
            self._context = real_get_context(method)

        def Queue(self):
            return self._context.Queue()

        def Process(self, target, args, **kwargs):
            spawned.append(args)
            return self._context.Process(target=target, args=args, **kwargs)

    monkeypatch.setattr(executor_module.multiprocessing, "get_context", RecordingContext)
    monkeypatch.setattr(executor_module, "run_worker", counting_worker)
    monkeypatch.setenv(_COUNT_FILE, str(tmp_path / "worker-config-reads.json"))
    config = EngineConfig(
        dtype="float32", model=str(tiny_checkpoint), tensor_parallel_size=2, num_kv_blocks=32
    )
    with LLMEngine(config) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        (output,) = engine.generate([[1, 5, 6, 7]], params, use_tqdm=False)
        assert len(output.token_ids) == 2
    assert config_json_opens == [str(tiny_checkpoint / "config.json")]  # rank 0's one read
    ((_, spec, rank, *_),) = spawned
    assert rank == 1
    assert isinstance(spec, ModelSpec) and isinstance(spec.checkpoint, CheckpointInfo)
    assert spec.checkpoint == engine.checkpoint
    assert json.loads((tmp_path / "worker-config-reads.json").read_text()) == []  # the worker's


def counting_worker(*args) -> None:
    """run_worker, noting every config.json the worker process opens (written out when it stops)."""
    opened: list[str] = []
    _count_opens(opened, lambda owner, name, value: setattr(owner, name, value))
    try:
        run_worker(*args)
    finally:
        Path(os.environ[_COUNT_FILE]).write_text(json.dumps(opened))


def _count_opens(opened: list[str], setattr_) -> None:
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and Path(file).name == "config.json":
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    setattr_(builtins, "open", counting_open)
    setattr_(io, "open", counting_open)


def vars_of(checkpoint: CheckpointInfo) -> list:
    return [getattr(checkpoint, field) for field in CheckpointInfo.__dataclass_fields__]
