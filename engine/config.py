"""EngineConfig: every engine option in one place, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = ("auto", *DTYPES)  # "auto": engine.executor.runtime.resolve_dtype
ATTENTION_BACKENDS = ("auto", "flash", "triton", "cpu", "sdpa")
QUANTIZATION_MODES = ("none", "int8", "nf4", "fp4", "fp8", "w8a8")
KV_CACHE_DTYPES = ("auto", "fp8")


class EngineConfigError(ValueError):
    pass


@dataclass(slots=True)
class EngineConfig:
    # a Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer files (checked when the
    # engine loads it, engine/loader/checkpoint.py); the service builds a demo model when it is empty
    model: str = ""
    # "auto": bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), float32 elsewhere
    dtype: str = "auto"
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    max_model_len: int | None = None  # prompt + output tokens; None: the model's own limit
    seed: int = 0  # for requests that carry no seed of their own
    # Scheduling
    max_num_seqs: int = 128  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens computed in one step (the per-step budget)
    enable_chunked_prefill: bool = True  # long prompts share steps with running decodes
    # A waiting request gains one priority level per this many steps, so that urgent requests
    # delay it by at most (its priority - theirs) * this many steps; 0: strict priority, no aging
    priority_aging_steps: int = 100
    # reuse the KV blocks of a prompt prefix an earlier request computed (same outputs either way)
    enable_prefix_caching: bool = True
    # Paged KV cache
    block_size: int | None = None  # tokens per block; None: 16, or 256 with FlashAttention (its page size)
    num_kv_blocks: int | None = None  # fixed pool size; None: from the memory budget below
    kv_cache_memory_gib: float = 2.0  # CPU: memory for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of GPU memory for weights + activations + KV cache
    # "auto": on CUDA flash-attn if installed, else "triton" (our paged decode kernel), else "sdpa";
    # on CPU "cpu" (our C++ paged kernel) where it builds and serves the model, else "sdpa"
    attention_backend: str = "auto"
    # CUDA: decode steps run as captured CUDA graphs (flash and triton backends) unless this is set
    enforce_eager: bool = False
    # CUDA: steps with prompt tokens (up to 512 tokens) also replay graphs, in pieces between the
    # attention calls (engine/executor/piecewise_graphs.py). Off until a GPU run has checked it.
    piecewise_cuda_graphs: bool = False
    # Step N+1's decodes scheduled and their inputs prepared while step N runs, its sampled tokens
    # feeding step N+1 on the device (engine/llm_engine.py); one process only. None: on for CUDA,
    # off on CPU, where the host work and the model share the cores and the GIL (loadtest/RESULTS.md)
    async_scheduling: bool | None = None
    # CPU: oneDNN packs each float linear weight once at load instead of on every matmul
    cpu_weight_prepack: bool = True
    # CPU: RMSNorm (+ residual), rotary embedding and SiLU-and-multiply as one C++ pass each
    cpu_fused_ops: bool = True
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8": e4m3 with a per-layer scale (sdpa only)
    # Weight quantisation of the linear layers (engine.quant); embedding and lm_head stay float
    # (with w8a8, quantize_lm_head makes the head int8 too).
    # "none", "int8", "nf4", "fp4" (bitsandbytes), "fp8" (CUDA, cc >= 8.9) or "w8a8" (int8 GEMMs:
    # PyTorch's on the CPU, Triton's on CUDA)
    quantization: str = "none"
    int8_threshold: float = 6.0  # int8: activation outlier threshold (LLM.int8); 0 disables the float path
    bnb_4bit_double_quant: bool = False  # nf4/fp4: also quantise the per-block scales (~0.4 bit/weight less)
    bnb_4bit_compute_dtype: str | None = None  # nf4/fp4: dtype of the matmul; None: dtype above
    quantization_skip_modules: tuple[
        str, ...
    ] = ()  # linear layers kept float, e.g. ("down_proj", "layers.0")
    # w8a8 only: the LM head int8 too (a decode step reads all of it: faster, at some quality cost;
    # loadtest/RESULTS.md). The embedding's lookup stays float, a tied head's float weight with it.
    quantize_lm_head: bool = False
    # Parallelism: tensor_parallel_size * pipeline_parallel_size processes (this one is rank 0)
    tensor_parallel_size: int = 1  # attention heads and MLP columns split across this many ranks
    pipeline_parallel_size: int = 1  # layers split into this many consecutive stages
    # mixture-of-experts layers: each tensor-parallel rank holds num_experts / tensor_parallel_size
    # whole experts (expert parallelism) instead of a 1 / tensor_parallel_size slice of every expert
    expert_parallel: bool = False
    distributed_timeout_s: float = 300.0  # a collective waiting longer than this fails the step
    # LoRA adapters (engine/lora): name -> a PEFT adapter folder (adapter_config.json and
    # adapter_model.safetensors), each read and checked against the model at start-up; a request
    # names its adapter by SamplingParams.lora_name
    lora_adapters: dict[str, str] = field(default_factory=dict)
    max_loras: int = 4  # adapters resident at once (slots); a step runs at most this many adapters
    max_lora_rank: int = 16  # the largest rank `r` an adapter may have (every slot is this wide)

    def __post_init__(self) -> None:
        if self.dtype not in MODEL_DTYPES:
            raise EngineConfigError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise EngineConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        _check_choice(self, "kv_cache_dtype", KV_CACHE_DTYPES)
        _check_choice(self, "quantization", QUANTIZATION_MODES)
        if self.bnb_4bit_compute_dtype is not None:
            _check_choice(self, "bnb_4bit_compute_dtype", DTYPES)
        if not isinstance(self.int8_threshold, int | float) or self.int8_threshold < 0:
            raise EngineConfigError(f"int8_threshold must be a number >= 0, got {self.int8_threshold!r}")
        if isinstance(self.quantization_skip_modules, str) or not all(
            isinstance(m, str) and m for m in self.quantization_skip_modules
        ):
            raise EngineConfigError(
                f"quantization_skip_modules must be a list of module names, got {self.quantization_skip_modules!r}"
            )
        self.quantization_skip_modules = tuple(self.quantization_skip_modules)
        if not isinstance(self.quantize_lm_head, bool):
            raise EngineConfigError(f"quantize_lm_head must be true or false, got {self.quantize_lm_head!r}")
        if self.kv_cache_dtype == "fp8" and self.attention_backend == "flash":
            raise EngineConfigError(
                "kv_cache_dtype 'fp8' needs attention_backend 'sdpa' (or 'auto'): flash-attn 2 reads "
                "only float16/bfloat16 caches"
            )
        _check_positive(self, "max_num_seqs", "max_num_batched_tokens")
        _check_positive(self, "block_size", "num_kv_blocks", optional=True)
        if not isinstance(self.priority_aging_steps, int) or self.priority_aging_steps < 0:
            raise EngineConfigError(
                f"priority_aging_steps must be an integer >= 0, got {self.priority_aging_steps!r}"
            )
        _check_positive(self, "tensor_parallel_size", "pipeline_parallel_size")
        if not isinstance(self.piecewise_cuda_graphs, bool):
            raise EngineConfigError(
                f"piecewise_cuda_graphs must be true or false, got {self.piecewise_cuda_graphs!r}"
            )
        if self.async_scheduling not in (None, True, False):
            raise EngineConfigError(
                f"async_scheduling must be true, false or unset, got {self.async_scheduling!r}"
            )
        if self.async_scheduling and self.world_size > 1:
            raise EngineConfigError(
                "async_scheduling runs in one process: it cannot be combined with tensor or pipeline parallelism"
            )
        if not isinstance(self.expert_parallel, bool):
            raise EngineConfigError(f"expert_parallel must be true or false, got {self.expert_parallel!r}")
        if self.distributed_timeout_s <= 0:
            raise EngineConfigError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        _check_lora(self)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory_gib <= 0:
            raise EngineConfigError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise EngineConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @property
    def uses_async_scheduling(self) -> bool:
        """async_scheduling as it applies here (None: CUDA's default on one process)."""
        if self.async_scheduling is None:
            return self.device.startswith("cuda") and self.world_size == 1
        return self.async_scheduling

    @property
    def world_size(self) -> int:
        """Processes the engine runs on: tensor_parallel_size * pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def _check_choice(config: EngineConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise EngineConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_lora(config: EngineConfig) -> None:
    _check_positive(config, "max_loras", "max_lora_rank")
    adapters = config.lora_adapters
    if not isinstance(adapters, dict) or not all(
        isinstance(name, str) and name and isinstance(path, str) and path for name, path in adapters.items()
    ):
        raise EngineConfigError(f"lora_adapters must map adapter names to folders, got {adapters!r}")
    config.lora_adapters = dict(adapters)


def _check_positive(config: EngineConfig, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if (value is None and optional) or (isinstance(value, int) and value >= 1):
            continue
        raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
