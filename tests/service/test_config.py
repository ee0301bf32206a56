"""load_config: defaults, then the TOML file named by SLUICE_CONFIG, then SLUICE_* variables."""

import dataclasses
import json
from pathlib import Path

import msgspec
import pytest

from engine import EngineConfig
from service.config import REPO_ROOT, ConfigError, ServiceConfig, environment_variables, load_config
from service.limits import JobLimits


def _toml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "sluice.toml"
    path.write_text(text)
    return {"SLUICE_CONFIG": str(path)}


def test_empty_environment_gives_the_documented_defaults() -> None:
    config = load_config({})
    assert config == ServiceConfig()
    assert config.kafka_bootstrap == "127.0.0.1:19092"
    assert config.jobs_topics == ["sluice.jobs"]
    assert (config.results_topic, config.dlq_topic, config.traces_topic) == (
        "sluice.results",
        "sluice.dlq",
        "sluice.traces",
    )
    assert (config.group_id, config.client_id, config.create_topics) == ("sluice", "sluice", True)
    assert (config.topic_partitions, config.topic_replication, config.commit_interval_ms) == (4, 1, 500)
    assert (config.engine.model, config.demo_preset, config.engine.dtype) == ("", "tiny", "auto")
    assert (config.engine.max_model_len, config.default_max_tokens) == (None, 256)
    assert (config.max_in_flight, config.drain_timeout_s) == (64, 30.0)
    assert config.build_dir == str(REPO_ROOT / "build")
    assert config.log_level == "INFO"
    assert config.served_model_name == "demo"


def test_load_config_ignores_unrelated_environment_variables() -> None:
    assert load_config({"PATH": "/bin", "SLUICE_NOT_A_FIELD": "x", "KAFKA_PORT": "1"}) == ServiceConfig()


def test_env_variables_override_strings_ints_floats_and_bools() -> None:
    config = load_config(
        {
            "SLUICE_KAFKA_BOOTSTRAP": "broker:9092",
            "SLUICE_MAX_IN_FLIGHT": "8",
            "SLUICE_DRAIN_TIMEOUT_S": "2.5",
            "SLUICE_CREATE_TOPICS": "false",
            "SLUICE_ENGINE_MAX_MODEL_LEN": "1024",
            "SLUICE_LOG_LEVEL": "DEBUG",
        }
    )
    assert config.kafka_bootstrap == "broker:9092"
    assert config.max_in_flight == 8
    assert config.drain_timeout_s == 2.5
    assert config.create_topics is False
    assert config.engine.max_model_len == 1024
    assert config.log_level == "DEBUG"


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)])
def test_bool_env_values_parse(raw: str, expected: bool) -> None:
    assert load_config({"SLUICE_CREATE_TOPICS": raw}).create_topics is expected


def test_jobs_topics_is_a_comma_list_with_blanks_dropped() -> None:
    config = load_config({"SLUICE_JOBS_TOPICS": "a, b ,,c"})
    assert config.jobs_topics == ["a", "b", "c"]


def test_compression_options_reach_the_engine_config() -> None:
    engine = load_config(
        {
            "SLUICE_ENGINE_QUANTIZATION": "nf4",
            "SLUICE_ENGINE_BNB_4BIT_DOUBLE_QUANT": "true",
            "SLUICE_ENGINE_BNB_4BIT_COMPUTE_DTYPE": "bfloat16",
            "SLUICE_ENGINE_QUANTIZATION_SKIP_MODULES": "down_proj, layers.0",
            "SLUICE_ENGINE_KV_CACHE_DTYPE": "fp8",
            "SLUICE_ENGINE_INT8_THRESHOLD": "0",
        }
    ).engine
    assert (engine.quantization, engine.bnb_4bit_double_quant, engine.bnb_4bit_compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert engine.quantization_skip_modules == ("down_proj", "layers.0")
    assert (engine.kv_cache_dtype, engine.int8_threshold) == ("fp8", 0.0)


@pytest.mark.parametrize("name", ["max_model_len", "bnb_4bit_compute_dtype", "block_size", "num_kv_blocks"])
def test_empty_value_of_an_optional_engine_option_means_none(name: str) -> None:
    assert getattr(load_config({f"SLUICE_ENGINE_{name.upper()}": ""}).engine, name) is None


def test_served_model_name_defaults_to_the_folder_name() -> None:
    assert load_config({"SLUICE_ENGINE_MODEL": "/models/llama-3"}).served_model_name == "llama-3"
    env = {"SLUICE_ENGINE_MODEL": "/models/llama-3", "SLUICE_MODEL_NAME": "l3"}
    assert load_config(env).served_model_name == "l3"


def test_toml_file_named_by_sluice_config_is_read(tmp_path: Path) -> None:
    env = _toml(
        tmp_path,
        'kafka_bootstrap = "k1:9092,k2:9092"\njobs_topics = ["x", "y"]\nmax_in_flight = 3\ncreate_topics = false\n',
    )
    config = load_config(env)
    assert config.kafka_bootstrap == "k1:9092,k2:9092"
    assert config.jobs_topics == ["x", "y"]
    assert config.max_in_flight == 3
    assert config.create_topics is False
    assert config.group_id == "sluice"  # untouched fields keep their defaults


def test_env_variables_override_the_toml_file(tmp_path: Path) -> None:
    env = _toml(tmp_path, 'jobs_topics = ["x"]\nmax_in_flight = 3\ngroup_id = "from-file"\n')
    env |= {"SLUICE_MAX_IN_FLIGHT": "5", "SLUICE_JOBS_TOPICS": "p,q"}
    config = load_config(env)
    assert (config.max_in_flight, config.jobs_topics, config.group_id) == (5, ["p", "q"], "from-file")


def test_unknown_toml_key_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_inflight"):
        load_config(_toml(tmp_path, "max_inflight = 3\n"))


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    env = _toml(tmp_path, "max_in_flight = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert env["SLUICE_CONFIG"] in str(info.value)


def test_missing_toml_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        load_config({"SLUICE_CONFIG": missing})
    assert missing in str(info.value)


@pytest.mark.parametrize("raw", ["0", "zero", "-3"])
def test_bad_max_in_flight_is_a_config_error_naming_the_field(raw: str) -> None:
    with pytest.raises(ConfigError, match="max_in_flight"):
        load_config({"SLUICE_MAX_IN_FLIGHT": raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SLUICE_CREATE_TOPICS", "maybe"),
        ("SLUICE_LOG_LEVEL", "LOUD"),
        ("SLUICE_COMMIT_INTERVAL_MS", "5"),
        ("SLUICE_DEMO_PRESET", "huge"),
        ("SLUICE_ENGINE_DTYPE", "float8"),
        ("SLUICE_ENGINE_DEVICE", "tpu"),
        ("SLUICE_ENGINE_QUANTIZATION", "int4"),
        ("SLUICE_ENGINE_KV_CACHE_DTYPE", "int8"),
        ("SLUICE_ENGINE_INT8_THRESHOLD", "-1"),
        ("SLUICE_ENGINE_MAX_NUM_SEQS", "0"),
        ("SLUICE_ENGINE_MAX_NUM_SEQS", "many"),
        ("SLUICE_ENGINE_BLOCK_SIZE", "-16"),
        ("SLUICE_ENGINE_GPU_MEMORY_UTILIZATION", "1.5"),
        ("SLUICE_ENGINE_ENFORCE_EAGER", "maybe"),
        ("SLUICE_ENGINE_DISTRIBUTED_TIMEOUT_S", "0"),
    ],
)
def test_bad_env_value_is_a_config_error_naming_the_field(name: str, raw: str) -> None:
    field = name.removeprefix("SLUICE_").removeprefix("ENGINE_").lower()
    with pytest.raises(ConfigError, match=field):
        load_config({name: raw})


def test_bad_toml_value_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="topic_partitions"):
        load_config(_toml(tmp_path, "topic_partitions = 0\n"))


def test_bad_engine_value_in_the_toml_table_is_a_config_error_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kv_cache_memory_gib"):
        load_config(_toml(tmp_path, "[engine]\nkv_cache_memory_gib = -1.0\n"))


def test_unknown_key_in_the_engine_table_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_numseqs"):
        load_config(_toml(tmp_path, "[engine]\nmax_numseqs = 3\n"))


def test_engine_options_no_longer_go_by_their_old_service_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_config(_toml(tmp_path, 'dtype = "bfloat16"\n'))  # belongs in [engine]
    assert load_config({"SLUICE_DTYPE": "bfloat16"}).engine.dtype == "auto"  # not a variable Sluice reads


# Every EngineConfig field is an engine option of the service: a new field is reachable from the
# TOML [engine] table and from SLUICE_ENGINE_<FIELD>, with no change to service/config.py.
ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]


def _example(name: str) -> tuple[object, str]:
    """A valid non-default value of the engine option, as TOML and as an environment variable."""
    if name in SPECIAL_VALUES:
        return SPECIAL_VALUES[name]
    default = getattr(EngineConfig(), name)
    if isinstance(default, bool):
        return (not default, str(not default).lower())
    if isinstance(default, int):
        return (default + 1, str(default + 1))
    raise AssertionError(f"give SPECIAL_VALUES an example for the new engine option {name!r}")


SPECIAL_VALUES: dict[str, tuple[object, str]] = {
    "model": ("/models/llama", "/models/llama"),
    "dtype": ("bfloat16", "bfloat16"),
    "async_scheduling": (True, "true"),  # None (the default) lets the device decide
    "device": ("cuda:1", "cuda:1"),
    "max_model_len": (1024, "1024"),
    "block_size": (32, "32"),
    "num_kv_blocks": (64, "64"),
    "kv_cache_memory_gib": (0.5, "0.5"),
    "gpu_memory_utilization": (0.75, "0.75"),
    "attention_backend": ("sdpa", "sdpa"),
    "kv_cache_dtype": ("fp8", "fp8"),
    "quantization": ("int8", "int8"),
    "int8_threshold": (4.5, "4.5"),
    "bnb_4bit_compute_dtype": ("float16", "float16"),
    "quantization_skip_modules": (("down_proj", "layers.0"), "down_proj, layers.0"),
    "distributed_timeout_s": (60.0, "60"),
    "lora_adapters": (
        {"formal": "/adapters/formal", "casual": "/a/c"},
        "formal=/adapters/formal, casual=/a/c",
    ),
}


@pytest.mark.parametrize("name", ENGINE_FIELDS)
def test_every_engine_option_is_set_by_the_engine_toml_table(tmp_path: Path, name: str) -> None:
    value, _ = _example(name)
    toml_value = json.dumps(list(value) if isinstance(value, tuple) else value)  # TOML's form too
    if isinstance(value, dict):  # an inline table
        toml_value = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"
    config = load_config(_toml(tmp_path, f"[engine]\n{name} = {toml_value}\n"))
    assert getattr(config.engine, name) == value
    assert config.engine == dataclasses.replace(EngineConfig(), **{name: value})


@pytest.mark.parametrize("name", ENGINE_FIELDS)
def test_every_engine_option_is_set_by_its_sluice_engine_variable(name: str) -> None:
    value, raw = _example(name)
    config = load_config({f"SLUICE_ENGINE_{name.upper()}": raw})
    assert config.engine == dataclasses.replace(EngineConfig(), **{name: value})


def test_engine_variables_override_the_engine_toml_table(tmp_path: Path) -> None:
    env = _toml(tmp_path, '[engine]\ndtype = "float16"\nmax_num_seqs = 8\n')
    env |= {"SLUICE_ENGINE_DTYPE": "bfloat16"}
    engine = load_config(env).engine
    assert (engine.dtype, engine.max_num_seqs) == ("bfloat16", 8)


def test_engine_defaults_are_engine_configs_defaults() -> None:
    assert load_config({}).engine == EngineConfig() == ServiceConfig().engine


def test_no_service_option_is_named_like_an_engine_variable() -> None:
    # SLUICE_ENGINE_<X> must mean one thing: engine option x
    assert not [name for name in ServiceConfig.__struct_fields__ if name.startswith("engine_")]


def test_the_service_declares_no_engine_option_of_its_own() -> None:
    assert not set(ServiceConfig.__struct_fields__) & set(ENGINE_FIELDS)


# The job limits are declared once, in service/limits.py, and nested as ServiceConfig.limits; an
# operator sets each by the name it always had: a top-level key, SLUICE_<NAME>.
LIMIT_FIELDS = list(JobLimits.__struct_fields__)


def _limit_example(name: str) -> tuple[object, str]:
    default = getattr(JobLimits(), name)
    if isinstance(default, bool):
        return (not default, str(not default).lower())
    return (default + 1, str(default + 1))


@pytest.mark.parametrize("name", LIMIT_FIELDS)
def test_every_limit_is_set_by_its_top_level_toml_key(tmp_path: Path, name: str) -> None:
    value, _ = _limit_example(name)
    config = load_config(_toml(tmp_path, f"{name} = {json.dumps(value)}\n"))
    assert config.limits == msgspec.structs.replace(JobLimits(), **{name: value})


@pytest.mark.parametrize("name", LIMIT_FIELDS)
def test_every_limit_is_set_by_its_sluice_variable(name: str) -> None:
    value, raw = _limit_example(name)
    assert f"SLUICE_{name.upper()}" in environment_variables()
    config = load_config({f"SLUICE_{name.upper()}": raw})
    assert config.limits == msgspec.structs.replace(JobLimits(), **{name: value})


def test_limit_variables_override_the_toml_file(tmp_path: Path) -> None:
    env = _toml(tmp_path, "max_stop_strings = 3\nmax_choices = 7\n")
    limits = load_config(env | {"SLUICE_MAX_STOP_STRINGS": "5"}).limits
    assert (limits.max_stop_strings, limits.max_choices) == (5, 7)


def test_limit_defaults_are_job_limits_defaults() -> None:
    assert load_config({}).limits == JobLimits() == ServiceConfig().limits


def test_a_limits_table_is_refused_naming_the_top_level_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'limits' is not a table: its options are top-level keys"):
        load_config(_toml(tmp_path, "[limits]\nmax_job_bytes = 10\n"))


def test_a_bad_limit_is_a_config_error_naming_it_as_the_operator_spelt_it() -> None:
    with pytest.raises(ConfigError, match=r"at `\$\.max_stop_strings`"):
        load_config({"SLUICE_MAX_STOP_STRINGS": "-1"})


def test_no_limit_is_named_like_a_service_option() -> None:
    # a limit and a service option share the top-level names: each must mean one thing
    assert not set(ServiceConfig.__struct_fields__) & set(LIMIT_FIELDS)
