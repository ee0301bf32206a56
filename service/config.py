"""ServiceConfig: defaults, then an optional TOML file, then SLUICE_* environment variables.

Every service option is a field below with its comment; `SLUICE_<FIELD>` (upper case)
overrides it, e.g. SLUICE_KAFKA_BOOTSTRAP=broker:9092. The engine's options are EngineConfig's
fields (engine/config.py), nested as `engine`: the `[engine]` table of the TOML file and
`SLUICE_ENGINE_<FIELD>` variables, e.g. SLUICE_ENGINE_MODEL=/models/llama,
SLUICE_ENGINE_DTYPE=bfloat16. The job limits are JobLimits' fields (service/limits.py), nested
as `limits` but set by their own names, top-level keys and SLUICE_<FIELD> (SLUICE_MAX_JOB_BYTES):
a flat table. In the environment a list is comma-separated and an empty value of an optional
option means None. SLUICE_CONFIG names the TOML file (keys are the field names). Documented in
docs/configuration.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import Meta, Struct

from engine import EngineConfig
from service import kafka_security
from service.limits import JobLimits

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    pass


# Nested options whose names are top-level keys and SLUICE_<FIELD> variables, not a table of
# their own: grouped in the code, they keep the names operators set them by.
FLAT_TABLES = ("limits",)


class ServiceConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    # Kafka
    kafka_bootstrap: str = "127.0.0.1:19092"  # host:port[,host:port...] of the cluster
    jobs_topics: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["sluice.jobs"]
    )
    results_topic: str = "sluice.results"  # a job's `reply_to` header overrides it
    # the regular expression a job's `reply_to` must fully match; empty: results_topic and
    # `<results_topic>.<anything>` (service/routing.py); the jobs, DLQ and traces topics never match
    reply_topics: str = ""
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
    # how the records Sluice produces (results, dead letters, traces) are compressed
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
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
    # Model and engine: the engine's own options are `engine` below
    model_name: str = ""  # the `model` reported in results; default: the model folder's name
    demo_preset: Literal["tiny", "small"] = "tiny"  # the demo model built when engine.model is empty
    default_max_tokens: Annotated[int, Meta(ge=1)] = 256  # when a job sets neither max_tokens field
    model_aliases: list[str] = msgspec.field(default_factory=list)  # other names a job's `model` may give
    # a job body field no request schema declares: "reject" (an error result naming it, as OpenAI
    # does) or "ignore" (vLLM's leniency, for producers written against it)
    unknown_fields: Literal["reject", "ignore"] = "reject"
    # how /v1/embeddings jobs pool the final hidden states: the last token's, or their mean
    embedding_pooling: Literal["last", "mean"] = "last"
    # the format of chat tool calls in the output; auto: harmony for a harmony reasoning parser (GPT-OSS),
    # else hermes if the chat template mentions <tool_call>, else llama3_json
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "harmony"] = "auto"
    # how a chat output's reasoning is split from its answer; auto: harmony for GPT-OSS, else none
    reasoning_parser: Literal["auto", "none", "harmony", "deepseek_r1"] = "auto"
    # EngineConfig (engine/config.py, where each option is explained and checked): the [engine] TOML
    # table, SLUICE_ENGINE_<FIELD> variables; an empty `model` means the built-in demo model
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    # Admission
    batch_max_size: Annotated[int, Meta(ge=1)] = 32  # the dynamic batcher flushes at this many jobs...
    batch_max_wait_ms: Annotated[float, Meta(ge=0)] = 5.0  # ...or this long after the first pending one
    max_in_flight: Annotated[int, Meta(ge=1)] = 64  # jobs consumed but not yet published: pause at this many
    max_in_flight_tokens: Annotated[int, Meta(ge=1)] = (
        262_144  # prompt + output tokens in flight: pause at this many
    )
    resume_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.5  # resume below this share of both limits
    drain_timeout_s: Annotated[float, Meta(ge=0)] = 30.0  # on shutdown, wait this long for in-flight jobs
    # the processes that render jobs' own chat templates (where limits.allow_job_chat_template)
    chat_template_workers: Annotated[int, Meta(ge=1)] = 2
    # /healthz fails while one task has held the tokenizer thread (which tokenises every job) this long
    tokenizer_stall_s: Annotated[float, Meta(gt=0)] = 60.0
    # What one job may ask for (service/limits.py's JobLimits, where each limit is explained), checked
    # before any work is done for it: nested here, set by their own names (a flat table, below)
    limits: JobLimits = msgspec.field(default_factory=JobLimits)
    # a fetched record batch, decompressed: a larger one (a compression bomb) is dead-lettered unread
    max_batch_bytes: Annotated[int, Meta(ge=65_536)] = 16_777_216
    # a result (or dead letter) larger than this is replaced by a `result_too_large` error result
    max_result_bytes: Annotated[int, Meta(ge=1024)] = 1_000_000
    # HTTP: /metrics (Prometheus), /healthz (liveness), /readyz (readiness)
    http_host: str = "0.0.0.0"
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 9464  # 0: any free port
    # Where demo models and other generated files go
    build_dir: str = str(REPO_ROOT / "build")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        try:
            kafka_security.check(self)
            re.compile(self.reply_topics)
            _check_adapter_names(self)
        except (ValueError, re.error) as e:
            raise ConfigError(str(e) if isinstance(e, ValueError) else f"reply_topics: {e}") from None

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.engine.model).name or "demo"


def load_config(environ: dict[str, str] | None = None) -> ServiceConfig:
    """Build the configuration from SLUICE_CONFIG (TOML) and SLUICE_* variables; ConfigError says what is wrong."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    if path := environ.get("SLUICE_CONFIG"):
        try:
            values.update(msgspec.toml.decode(Path(path).read_bytes()))
        except (OSError, msgspec.DecodeError) as e:
            raise ConfigError(f"SLUICE_CONFIG={path}: {e}") from None
    fields = mi.type_info(ServiceConfig).fields
    _nest_flat_tables(values, fields)
    _override_from_environ(values, fields, "SLUICE_", environ)
    try:
        return msgspec.convert(values, ServiceConfig, strict=False)
    except msgspec.ValidationError as e:
        message = re.sub(rf"\$\.(?:{'|'.join(FLAT_TABLES)})\.", "$.", str(e))  # as the operator spelt it
        raise ConfigError(
            f"invalid configuration (SLUICE_<FIELD>, SLUICE_ENGINE_<FIELD> or the TOML key): {message}"
        ) from None


def environment_variables() -> set[str]:
    """Every variable load_config reads: SLUICE_CONFIG, SLUICE_<FIELD> (the limits' too) and
    SLUICE_ENGINE_<FIELD>."""
    return {"SLUICE_CONFIG", *_variables(mi.type_info(ServiceConfig).fields, "SLUICE_")}


def _nest_flat_tables(values: dict[str, object], fields: tuple[mi.Field, ...]) -> None:
    """Move a flat table's top-level keys into its table; the table's own name is no key."""
    for field in fields:
        if field.name in FLAT_TABLES:
            if field.name in values:
                names = ", ".join(f.name for f in field.type.fields[:2])
                raise ConfigError(
                    f"{field.name!r} is not a table: its options are top-level keys ({names}, ...)"
                )
            own = {f.name for f in field.type.fields}
            values[field.name] = {name: values.pop(name) for name in list(values) if name in own}


def _override_from_environ(
    values: dict[str, object], fields: tuple[mi.Field, ...], prefix: str, environ: dict[str, str]
) -> None:
    """Set each field whose `<prefix><FIELD>` variable is set; a nested table's fields go by
    `<prefix><TABLE>_<FIELD>` (SLUICE_ENGINE_DTYPE sets dtype in [engine]), a flat table's by
    `<prefix><FIELD>` (SLUICE_MAX_JOB_BYTES sets limits.max_job_bytes)."""
    for field in fields:
        name = f"{prefix}{field.name.upper()}"
        if isinstance(field.type, mi.DataclassType | mi.StructType):
            table = values.setdefault(field.name, {})
            if isinstance(table, dict):  # anything else: msgspec.convert names the mistake
                _check_known_keys(table, field)
                _override_from_environ(table, field.type.fields, _table_prefix(field, prefix), environ)
        elif (raw := environ.get(name)) is not None:
            values[field.name] = _from_env(field.type, raw)


def _table_prefix(field: mi.Field, prefix: str) -> str:
    return prefix if field.name in FLAT_TABLES else f"{prefix}{field.name.upper()}_"


def _check_known_keys(table: dict[str, object], field: mi.Field) -> None:
    # msgspec ignores unknown keys of a dataclass; a misspelt option must not go unnoticed
    known = {f.name for f in field.type.fields}
    if unknown := sorted(set(table) - known):
        raise ConfigError(f"unknown option {unknown[0]!r} in the [{field.name}] table")


def _from_env(field_type: mi.Type, raw: str) -> object:
    """The variable's text as the field's type reads it: a comma-separated list for a list or
    tuple, comma-separated `key=value` pairs for a mapping (lora_adapters), None for an empty value
    of an optional field, else the text (msgspec converts it)."""
    types = field_type.types if isinstance(field_type, mi.UnionType) else (field_type,)
    if raw == "" and any(isinstance(t, mi.NoneType) for t in types):
        return None
    if any(isinstance(t, mi.DictType) for t in types):
        return parse_pairs(item for item in raw.split(",") if item.strip())
    if any(isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType) for t in types):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def parse_pairs(items) -> dict[str, str]:
    """`name=value` items as a dict (the variable SLUICE_ENGINE_LORA_ADAPTERS, `--lora` options)."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"expected NAME=VALUE, got {item!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def _variables(fields: tuple[mi.Field, ...], prefix: str) -> Iterator[str]:
    for field in fields:
        if isinstance(field.type, mi.DataclassType | mi.StructType):
            yield from _variables(field.type.fields, _table_prefix(field, prefix))
        else:
            yield f"{prefix}{field.name.upper()}"


def _check_adapter_names(config: ServiceConfig) -> None:
    # a job's `model` picks the base model or one adapter: each name must mean one thing
    taken = {config.served_model_name, *config.model_aliases} & set(config.engine.lora_adapters)
    if taken:
        raise ValueError(
            f"lora_adapters: {sorted(taken)[0]!r} is also the served model's name or an alias; "
            "a job's `model` must name one of them"
        )
