"""The engine: a library that runs Llama-family checkpoints. Knows nothing of Kafka or the wire format."""

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig, EngineConfigError
from engine.distributed.executor import EngineDeadError, WorkerDiedError
from engine.engine_thread import EngineThread
from engine.llm_engine import LLMEngine, RequestRejected
from engine.loader import ModelLoadError
from engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams, StructuredOutputs

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "EngineThread",
    "LLMEngine",
    "ModelLoadError",
    "RequestMetrics",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "StructuredOutputs",
    "TokenLogprob",
    "WorkerDiedError",
]
