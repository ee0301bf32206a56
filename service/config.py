"""ServiceConfig: defaults, then an optional TOML file, then SLUICE_* environment variables.

Every option is a field below with its comment; `SLUICE_<FIELD>` (upper case) overrides it,
e.g. SLUICE_KAFKA_BOOTSTRAP=broker:9092, SLUICE_MODEL=/models/llama. Lists in the environment
are comma-separated. SLUICE_CONFIG names the TOML file (keys are the field names).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from engine import EngineConfig
from service import kafka_security

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    pass


class ServiceConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    # Kafka
    kafka_bootstrap: str = "127.0.0.1:19092"  # host:port[,host:port...] of the cluster
    jobs_topics: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["sluice.jobs"]
    )
    results_topic: str = "sluice.results"  # a job's `reply_to` header overrides it
    dlq_topic: str = "sluice.dlq"  # dead letters: the original record plus the reason in headers
    traces_topic: str = "sluice.traces"  # OTLP protobuf spans, one ExportTraceServiceRequest per record
    traces_enabled: bool = True
    otlp_endpoint: str = ""  # also export spans over OTLP/HTTP, e.g. http://collector:4318/v1/traces
    group_id: str = "sluice"  # consumer group; instances sharing it share the partitions
    client_id: str = "sluice"
    create_topics: bool = True  # create missing topics at start-up (needs create rights)
    topic_partitions: Annotated[int, Meta(ge=1)] = 4  # for topics Sluice creates
    topic_replication: Annotated[int, Meta(ge=1)] = 1
    commit_interval_ms: Annotated[int, Meta(ge=10)] = 500  # how often finished offsets are committed
    # at_least_once: results published as jobs finish, offsets committed once acknowledged (a crash
    # may repeat a result); exactly_once: results and offsets in one transaction per partition per
    # commit interval (results' readers must use isolation_level=read_committed)
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id_prefix: str = ""  # exactly_once: `<prefix>.<topic>.<partition>`; default: group_id
    # Kafka security (service/kafka_security.py checks that these fit together)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = ""  # with SASL_*
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = (
        ""  # best from a secret store, e.g. a Kubernetes Secret as SLUICE_KAFKA_SASL_PASSWORD
    )
    kafka_ssl_cafile: str = ""  # PEM of the CAs that sign the brokers' certificates; empty: the system's
    kafka_ssl_certfile: str = ""  # PEM client certificate, for brokers that require mutual TLS
    kafka_ssl_keyfile: str = ""  # PEM key of the client certificate
    kafka_ssl_password: str = ""  # password of the key file, if it is encrypted
    kafka_ssl_check_hostname: bool = True  # the broker's certificate must name the host we connect to
    # Model and engine
    model: str = ""  # a Hugging Face checkpoint folder; empty: the built-in demo model
    model_name: str = ""  # the `model` reported in results; default: the folder's name
    demo_preset: Literal["tiny", "small"] = "tiny"  # the demo model built when `model` is empty
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_model_len: Annotated[int, Meta(ge=2)] | None = None
    default_max_tokens: Annotated[int, Meta(ge=1)] = 256  # when a job sets neither max_tokens field
    max_num_seqs: Annotated[int, Meta(ge=1)] = 128  # sequences in one engine step
    max_num_batched_tokens: Annotated[int, Meta(ge=1)] = 2048  # tokens computed in one engine step
    kv_cache_memory_gib: Annotated[float, Meta(gt=0)] = 2.0  # CPU: memory for the paged KV cache
    gpu_memory_utilization: Annotated[float, Meta(gt=0, le=1)] = 0.9  # CUDA: share of GPU memory Sluice uses
    attention_backend: Literal["auto", "flash", "triton", "sdpa"] = "auto"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes earlier jobs computed
    # Compression (engine.quant): weights of the linear layers, and the KV cache
    quantization: Literal["none", "int8", "nf4", "fp4", "fp8"] = "none"
    int8_threshold: Annotated[float, Meta(ge=0)] = 6.0  # int8: LLM.int8 activation outlier threshold
    bnb_4bit_double_quant: bool = False  # nf4/fp4: quantise the per-block scales too
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: dtype
    quantization_skip_modules: list[str] = msgspec.field(default_factory=list)  # linear layers kept float
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    tensor_parallel_size: Annotated[int, Meta(ge=1)] = 1  # engine processes splitting each layer
    pipeline_parallel_size: Annotated[int, Meta(ge=1)] = 1  # engine processes each running a stage of layers
    # Admission
    batch_max_size: Annotated[int, Meta(ge=1)] = 32  # the dynamic batcher flushes at this many jobs...
    batch_max_wait_ms: Annotated[float, Meta(ge=0)] = 5.0  # ...or this long after the first pending one
    max_in_flight: Annotated[int, Meta(ge=1)] = 64  # jobs consumed but not yet published: pause at this many
    max_in_flight_tokens: Annotated[int, Meta(ge=1)] = (
        262_144  # prompt + output tokens in flight: pause at this many
    )
    resume_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.5  # resume below this share of both limits
    drain_timeout_s: Annotated[float, Meta(ge=0)] = 30.0  # on shutdown, wait this long for in-flight jobs
    # HTTP: /metrics (Prometheus), /healthz (liveness), /readyz (readiness)
    http_host: str = "0.0.0.0"
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 9464  # 0: any free port
    # Where demo models and other generated files go
    build_dir: str = str(REPO_ROOT / "build")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        try:
            kafka_security.check(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model).name or "demo"

    def engine_config(self, model: str) -> EngineConfig:
        return EngineConfig(
            model=model,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_gib=self.kv_cache_memory_gib,
            gpu_memory_utilization=self.gpu_memory_utilization,
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            quantization=self.quantization,
            int8_threshold=self.int8_threshold,
            bnb_4bit_double_quant=self.bnb_4bit_double_quant,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
            quantization_skip_modules=tuple(self.quantization_skip_modules),
            kv_cache_dtype=self.kv_cache_dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
        )


def load_config(environ: dict[str, str] | None = None) -> ServiceConfig:
    """Build the configuration from SLUICE_CONFIG (TOML) and SLUICE_* variables; ConfigError says what is wrong."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    if path := environ.get("SLUICE_CONFIG"):
        try:
            values.update(msgspec.toml.decode(Path(path).read_bytes()))
        except (OSError, msgspec.DecodeError) as e:
            raise ConfigError(f"SLUICE_CONFIG={path}: {e}") from None
    for name in ServiceConfig.__struct_fields__:
        raw = environ.get(f"SLUICE_{name.upper()}")
        if raw is not None:
            values[name] = _from_env(name, raw)
    try:
        return msgspec.convert(values, ServiceConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid configuration (SLUICE_<FIELD> or the TOML key): {e}") from None


def _from_env(name: str, raw: str) -> object:
    if name in ("jobs_topics", "quantization_skip_modules"):
        return [t.strip() for t in raw.split(",") if t.strip()]
    if raw == "" and name in ("max_model_len", "bnb_4bit_compute_dtype"):
        return None
    return raw
