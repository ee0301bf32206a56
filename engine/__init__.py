"""The engine: a library that runs Llama-family checkpoints. Knows nothing of Kafka or the wire format."""

from engine.async_engine import AsyncLLMEngine
from engine.checkpoint import ModelLoadError
from engine.config import EngineConfig, EngineConfigError
from engine.distributed.executor import EngineDeadError, WorkerDiedError
from engine.engine_thread import EngineThread
from engine.input_processor import RequestRejected
from engine.llm_engine import LLMEngine
from engine.outputs import OutputLogprob, RequestMetrics, RequestOutput
from engine.pooling import PoolingParams
from engine.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs
from engine.stats import EngineStats

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "EngineStats",
    "EngineThread",
    "LLMEngine",
    "ModelLoadError",
    "OutputLogprob",
    "PoolingParams",
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
    # The demo-model builder (engine/demo_models.py) imports Transformers' model classes, which
    # take seconds: it loads on first use, `from engine import ensure_demo_checkpoint`.
    if name == "ensure_demo_checkpoint":
        from engine.demo_models import ensure_checkpoint

        return ensure_checkpoint
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
