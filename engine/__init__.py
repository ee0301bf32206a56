"""The engine's door: a library that serves Hugging Face decoder checkpoints (dense and mixture-of-experts).

Knows nothing of Kafka or the wire format. The service and offline users import from here only;
the folders behind it are laid out by role (docs/engine.md opens with the map).
"""

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig, EngineConfigError
from engine.core.input_processor import RequestRejected
from engine.core.pooling import PoolingParams
from engine.core.stats import EngineStats
from engine.engine_thread import EngineThread
from engine.executor.executor import EngineDeadError, WorkerDiedError
from engine.llm_engine import LLMEngine, RequestFailed
from engine.loader.checkpoint import ModelLoadError
from engine.lora import LoRAError
from engine.outputs import OutputLogprob, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "EngineStats",
    "EngineThread",
    "LLMEngine",
    "LoRAError",
    "ModelLoadError",
    "OutputLogprob",
    "PoolingParams",
    "RequestFailed",
    "RequestMetrics",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "SamplingParamsError",
    "StructuredOutputs",
    "WorkerDiedError",
    "ensure_demo_checkpoint",
]


def __getattr__(name: str):
    # The demo-model builder (engine/demo/checkpoints.py) imports Transformers' model classes, which
    # take seconds: it loads on first use, `from engine import ensure_demo_checkpoint`.
    if name == "ensure_demo_checkpoint":
        from engine.demo.checkpoints import ensure_checkpoint

        return ensure_checkpoint
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
