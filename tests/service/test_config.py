"""load_config: defaults, then the TOML file named by SLUICE_CONFIG, then SLUICE_* variables."""

from pathlib import Path

import pytest

from service.config import REPO_ROOT, ConfigError, ServiceConfig, load_config


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
    assert (config.model, config.demo_preset, config.dtype, config.device) == ("", "tiny", "float32", "cpu")
    assert (config.max_model_len, config.default_max_tokens) == (None, 256)
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
            "SLUICE_MAX_MODEL_LEN": "1024",
            "SLUICE_LOG_LEVEL": "DEBUG",
        }
    )
    assert config.kafka_bootstrap == "broker:9092"
    assert config.max_in_flight == 8
    assert config.drain_timeout_s == 2.5
    assert config.create_topics is False
    assert config.max_model_len == 1024
    assert config.log_level == "DEBUG"


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)])
def test_bool_env_values_parse(raw: str, expected: bool) -> None:
    assert load_config({"SLUICE_CREATE_TOPICS": raw}).create_topics is expected


def test_jobs_topics_is_a_comma_list_with_blanks_dropped() -> None:
    config = load_config({"SLUICE_JOBS_TOPICS": "a, b ,,c"})
    assert config.jobs_topics == ["a", "b", "c"]


def test_compression_options_reach_the_engine_config(tmp_path: Path) -> None:
    config = load_config(
        {
            "SLUICE_QUANTIZATION": "nf4",
            "SLUICE_BNB_4BIT_DOUBLE_QUANT": "true",
            "SLUICE_BNB_4BIT_COMPUTE_DTYPE": "bfloat16",
            "SLUICE_QUANTIZATION_SKIP_MODULES": "down_proj, layers.0",
            "SLUICE_KV_CACHE_DTYPE": "fp8",
            "SLUICE_INT8_THRESHOLD": "0",
        }
    )
    engine = config.engine_config(str(tmp_path))
    assert (engine.quantization, engine.bnb_4bit_double_quant, engine.bnb_4bit_compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert engine.quantization_skip_modules == ("down_proj", "layers.0")
    assert (engine.kv_cache_dtype, engine.int8_threshold) == ("fp8", 0.0)


def test_empty_max_model_len_means_the_models_own_limit() -> None:
    assert load_config({"SLUICE_MAX_MODEL_LEN": ""}).max_model_len is None


def test_served_model_name_defaults_to_the_folder_name() -> None:
    assert load_config({"SLUICE_MODEL": "/models/llama-3"}).served_model_name == "llama-3"
    assert (
        load_config({"SLUICE_MODEL": "/models/llama-3", "SLUICE_MODEL_NAME": "l3"}).served_model_name == "l3"
    )


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
        ("SLUICE_DTYPE", "float8"),
        ("SLUICE_LOG_LEVEL", "LOUD"),
        ("SLUICE_COMMIT_INTERVAL_MS", "5"),
        ("SLUICE_DEMO_PRESET", "huge"),
        ("SLUICE_QUANTIZATION", "int4"),
        ("SLUICE_KV_CACHE_DTYPE", "int8"),
        ("SLUICE_INT8_THRESHOLD", "-1"),
    ],
)
def test_bad_env_value_is_a_config_error_naming_the_field(name: str, raw: str) -> None:
    field = name.removeprefix("SLUICE_").lower()
    with pytest.raises(ConfigError, match=field):
        load_config({name: raw})


def test_bad_toml_value_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="topic_partitions"):
        load_config(_toml(tmp_path, "topic_partitions = 0\n"))
