"""EngineConfig: every engine option in one place, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class EngineConfigError(ValueError):
    pass


@dataclass(slots=True)
class EngineConfig:
    model: str  # a Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer files
    dtype: str = "float32"
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    max_model_len: int | None = None  # prompt + output tokens; None: the model's own limit
    seed: int = 0  # for requests that carry no seed of their own

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise EngineConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not Path(self.model).is_dir():
            raise EngineConfigError(f"model folder {self.model!r} does not exist or is not a folder")
