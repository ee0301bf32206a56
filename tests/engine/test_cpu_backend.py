"""The CPU paged kernel is the attention backend "cpu", chosen once at start-up by the runtime's
one rule (engine.executor.runtime): "auto" takes it on CPU where the kernel builds and serves the
model, and "sdpa" otherwise, saying why once; asked for by name where it cannot run, it is
refused with the reason. Nothing outside a backend switches it afterwards."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from engine import EngineConfig, EngineConfigError, LLMEngine, SamplingParams
from engine.demo.checkpoints import ensure_checkpoint
from engine.executor import model_runner
from engine.executor.runtime import ModelTraits, Runtime, model_traits, resolve_runtime, select_backend
from engine.kernels import cpu_kernels
from engine.layers.attention import Attention
from engine.layers.attention_backends import CpuAttentionBackend, SdpaBackend, make_backend
from engine.loader.checkpoint import read_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gemma2_checkpoint(model_cache):
    return ensure_checkpoint(model_cache, preset="tiny-gemma2")  # soft-capped attention logits


def _traits(folder) -> ModelTraits:
    return model_traits(read_checkpoint(folder)[0])


@pytest.fixture
def kernel_unavailable(monkeypatch):
    """This process as one where the kernel did not build."""
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_failure", "RuntimeError: no C++ compiler")


def test_auto_on_cpu_chooses_the_kernel_where_it_loads(tiny_checkpoint):
    assert cpu_kernels.load()  # the project's machines have a C++ compiler
    assert resolve_runtime(
        EngineConfig(model=str(tiny_checkpoint)), traits=_traits(tiny_checkpoint)
    ) == Runtime("cpu", 16)
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="float32", max_model_len=64))
    assert engine.attention_backend == "cpu"
    backends = {id(layer.backend) for layer in engine.runner.layers}
    assert len(backends) == 1 and isinstance(engine.runner.layers[0].backend, CpuAttentionBackend)


@pytest.mark.parametrize(
    ("traits", "options", "reason"),
    [
        (ModelTraits(soft_caps=True), {}, "the model soft-caps its attention logits (Gemma 2)"),
        (ModelTraits(has_sinks=True), {}, "the model has attention sinks (GPT-OSS)"),
        (ModelTraits(), {"kv_cache_dtype": "fp8"}, "kv_cache_dtype 'fp8'"),
        (ModelTraits(), {"block_size": 8}, "block_size 8 (the kernel reads pages of a multiple of 16 keys)"),
    ],
)
def test_auto_gives_a_model_the_kernel_cannot_serve_sdpa_and_says_why(traits, options, reason, caplog):
    with caplog.at_level(logging.INFO, logger="engine.executor.runtime"):
        assert select_backend("auto", CPU, traits=traits, **options) == "sdpa"
    (record,) = caplog.records
    assert record.getMessage().startswith("attention backend: sdpa, not the CPU paged kernel: " + reason)


def test_a_soft_capped_gemma2_gets_sdpa_once_at_start_up_and_the_kernel_never_runs(
    gemma2_checkpoint, monkeypatch, caplog
):
    def kernel_called(*args):
        raise AssertionError("the CPU paged kernel ran for a soft-capped model")

    monkeypatch.setattr(cpu_kernels, "paged_attention", kernel_called)
    with caplog.at_level(logging.INFO, logger="engine.executor.runtime"):
        engine = LLMEngine(EngineConfig(model=str(gemma2_checkpoint), dtype="float32", max_model_len=64))
    assert engine.attention_backend == "sdpa"
    assert caplog.text.count("soft-caps its attention logits") == 1
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.generate([[1, 5, 6, 7]], params, use_tqdm=False)


def test_a_gemma2_checkpoint_without_a_soft_cap_is_served_by_the_kernel(model_cache):
    folder = ensure_checkpoint(model_cache, preset="tiny-gemma2-mqa")  # attn_logit_softcapping: null
    assert resolve_runtime(EngineConfig(model=str(folder)), traits=_traits(folder)).attention_backend == "cpu"


@pytest.mark.parametrize(
    ("device", "traits", "options", "reason"),
    [
        ("cuda", ModelTraits(), {}, "it runs on the CPU, and the device is 'cuda'"),
        ("cpu", ModelTraits(soft_caps=True), {}, "the model soft-caps its attention logits"),
        ("cpu", ModelTraits(has_sinks=True), {}, "the model has attention sinks"),
        ("cpu", ModelTraits(), {"kv_cache_dtype": "fp8"}, "kv_cache_dtype 'fp8'"),
        ("cpu", ModelTraits(), {"block_size": 24}, "block_size 24"),
    ],
)
def test_cpu_asked_for_where_it_cannot_run_is_refused_with_the_reason(device, traits, options, reason):
    with pytest.raises(EngineConfigError, match=r"attention_backend 'cpu' cannot run: " + reason):
        select_backend("cpu", torch.device(device), traits=traits, **options)


def test_cpu_asked_for_where_the_kernel_cannot_build_is_refused_with_the_build_error(
    tiny_checkpoint, kernel_unavailable
):
    config = EngineConfig(model=str(tiny_checkpoint), attention_backend="cpu")
    with pytest.raises(
        EngineConfigError, match=r"the kernel is unavailable here \(RuntimeError: no C\+\+ compiler\)"
    ):
        resolve_runtime(config, traits=_traits(tiny_checkpoint))
    assert resolve_runtime(
        EngineConfig(model=str(tiny_checkpoint)), traits=_traits(tiny_checkpoint)
    ) == Runtime("sdpa", 16)


def test_cpu_asked_for_a_soft_capped_gemma2_is_refused_before_loading(gemma2_checkpoint):
    config = EngineConfig(model=str(gemma2_checkpoint), attention_backend="cpu")
    with pytest.raises(EngineConfigError, match="soft-caps its attention logits"):
        LLMEngine(config)


def test_binding_the_cpu_backend_to_a_layer_it_cannot_run_is_refused():
    with pytest.raises(
        ValueError, match="attention_backend 'cpu' cannot run this model: the model soft-caps"
    ):
        Attention(4, 16, 0.25, 2, logits_soft_cap=30.0).backend = CpuAttentionBackend()
    with pytest.raises(
        ValueError, match="attention_backend 'cpu' cannot run this model: the model has attention sinks"
    ):
        Attention(4, 16, 0.25, 2, sinks=torch.zeros(4)).backend = CpuAttentionBackend()
    Attention(4, 16, 0.25, 2, sliding_window=8).backend = CpuAttentionBackend()  # a window: served


def test_on_a_machine_that_is_not_x86_the_kernels_do_not_load_and_say_why_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")

    def built(*args, **kwargs):
        raise AssertionError("a build was tried on a machine that is not x86")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", built)
    with caplog.at_level(logging.WARNING, logger="engine.kernels.cpu_kernels"):
        assert not cpu_kernels.load() and not cpu_kernels.load()
    (record,) = caplog.records
    assert "the kernels are x86 code (immintrin.h) and this machine is aarch64" in record.getMessage()
    assert select_backend("auto", CPU) == "sdpa"


class _Recording:
    """A backend that records every attribute written on it once built."""

    def __setattr__(self, name, value):
        if "writes" in vars(self):
            self.writes.append(name)
        super().__setattr__(name, value)


@pytest.mark.parametrize(("backend", "written_by_itself"), [("cpu", []), ("sdpa", ["compiled_decode"])])
def test_nothing_outside_the_backend_switches_it_after_start_up(
    tiny_checkpoint, monkeypatch, backend, written_by_itself
):
    made = []

    def recording_backend(name, compiled_decode=True):
        recorded = make_backend(name, compiled_decode)
        recorded.__class__ = type(f"Recording{type(recorded).__name__}", (_Recording, type(recorded)), {})
        recorded.writes = []
        made.append(recorded)
        return recorded

    monkeypatch.setattr(model_runner, "make_backend", recording_backend)
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="float32", attention_backend=backend))
    engine.generate([[1, 5, 6, 7], [1, 8]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    (recorded,) = made
    # the SDPA backend's warm_up, once the cache is bound, is the only write: its own decision
    assert recorded.writes == written_by_itself
    assert not hasattr(recorded, "cpu_kernel")
    assert isinstance(recorded, SdpaBackend)


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """load() as in a new process whose TORCH_EXTENSIONS_DIR is a folder it cannot write to (an
    image's, as uid 10001 or on a read-only root filesystem); what it loads or builds recorded."""
    root = tmp_path / "image-extensions"
    root.mkdir()
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setattr(cpu_kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    access = cpu_kernels.os.access
    read_only = str(root)

    def no_writes_under_root(path, mode):
        return not (mode & cpu_kernels.os.W_OK and str(path).startswith(read_only)) and access(path, mode)

    monkeypatch.setattr(cpu_kernels.os, "access", no_writes_under_root)
    seen = {"loaded": [], "built": []}
    monkeypatch.setattr(torch.ops, "load_library", lambda path: seen["loaded"].append(path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **options: seen["built"].append(options))
    return root, seen


def test_a_read_only_cache_holding_a_build_for_this_cpu_is_loaded_as_it_is(fresh_load):
    root, seen = fresh_load
    name = cpu_kernels.extension_name(cpu_kernels._vector_flags()[0])
    (root / name).mkdir()
    (root / name / f"{name}.so").write_bytes(b"")
    assert cpu_kernels.load()
    assert seen == {"loaded": [str(root / name / f"{name}.so")], "built": []}


def test_a_read_only_cache_built_for_another_cpu_gives_a_build_under_the_temporary_folder(fresh_load):
    root, seen = fresh_load
    other = cpu_kernels.extension_name("avx2" if cpu_kernels._vector_flags()[0] != "avx2" else "avx512")
    (root / other).mkdir()
    (root / other / f"{other}.so").write_bytes(b"")
    assert cpu_kernels.load()
    name = cpu_kernels.extension_name(cpu_kernels._vector_flags()[0])
    (built,) = seen["built"]
    assert seen["loaded"] == [] and built["name"] == name
    assert (
        Path(built["build_directory"]) == Path(cpu_kernels.tempfile.gettempdir()) / "torch_extensions" / name
    )


def test_a_writable_cache_is_left_to_torchs_builder(fresh_load, monkeypatch, tmp_path):
    _, seen = fresh_load
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "writable"))
    assert cpu_kernels.load()
    (built,) = seen["built"]
    assert built["build_directory"] is None  # torch's: TORCH_EXTENSIONS_DIR/<name>, locked while building
