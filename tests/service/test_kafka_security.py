"""SASL (PLAIN, SCRAM-SHA-256/512) and TLS: checked configuration, and job round trips on a
real broker with a SASL_PLAINTEXT or SASL_SSL listener (deploy/kafka/kafka.sh, ports 29xxx)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from service.client.submit import submit_jobs
from service.config import ConfigError, ServiceConfig, load_config
from service.kafka_security import KafkaLoginError, check_login, client_options
from tests.conftest import BUILD_DIR, REPO_ROOT
from tests.service.conftest import KafkaClient

KAFKA_SH = REPO_ROOT / "deploy" / "kafka" / "kafka.sh"
USER, PASSWORD = "sluice-test", "s3cret-for-tests"


# -- configuration ---------------------------------------------------------------------------


def test_sasl_protocol_without_a_mechanism_names_the_missing_option():
    with pytest.raises(ConfigError, match="needs kafka_sasl_mechanism"):
        load_config({"SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})


def test_sasl_mechanism_without_credentials_is_a_clear_error():
    env = {"SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SLUICE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}
    with pytest.raises(ConfigError, match="needs credentials: kafka_sasl_username and kafka_sasl_password"):
        load_config(env)
    with pytest.raises(ConfigError, match="kafka_sasl_password must be set"):
        load_config({**env, "SLUICE_KAFKA_SASL_USERNAME": "alice"})


def test_credentials_without_a_sasl_protocol_are_refused_rather_than_silently_unused():
    with pytest.raises(ConfigError, match="kafka_sasl_username is set but kafka_security_protocol=PLAINTEXT"):
        load_config({"SLUICE_KAFKA_SASL_USERNAME": "alice", "SLUICE_KAFKA_SASL_PASSWORD": "x"})
    with pytest.raises(ConfigError, match="kafka_sasl_mechanism is set"):
        load_config({"SLUICE_KAFKA_SASL_MECHANISM": "PLAIN"})


def test_tls_files_must_exist_and_need_a_tls_protocol(tmp_path):
    with pytest.raises(ConfigError, match="kafka_ssl_cafile: no such file"):
        load_config({"SLUICE_KAFKA_SECURITY_PROTOCOL": "SSL", "SLUICE_KAFKA_SSL_CAFILE": str(tmp_path / "x")})
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    with pytest.raises(ConfigError, match="does not use TLS"):
        load_config({"SLUICE_KAFKA_SSL_CAFILE": str(ca)})
    with pytest.raises(ConfigError, match="kafka_ssl_keyfile is set without kafka_ssl_certfile"):
        load_config({"SLUICE_KAFKA_SECURITY_PROTOCOL": "SSL", "SLUICE_KAFKA_SSL_KEYFILE": str(ca)})


def test_unknown_mechanism_or_protocol_is_refused():
    with pytest.raises(ConfigError, match="kafka_sasl_mechanism"):
        load_config({"SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SLUICE_KAFKA_SASL_MECHANISM": "GSSAPI"})
    with pytest.raises(ConfigError, match="kafka_security_protocol"):
        load_config({"SLUICE_KAFKA_SECURITY_PROTOCOL": "TLS"})


def test_client_options_carry_sasl_credentials_and_a_verifying_tls_context():
    assert client_options(ServiceConfig()) == {}  # PLAINTEXT: the clients' own defaults
    config = ServiceConfig(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="alice",
        kafka_sasl_password="pw",
    )
    options = client_options(config)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "alice",
        "pw",
    )
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


# -- a real broker with a SASL listener ----------------------------------------------------------


class SecureBroker:
    """A broker of our own (kafka.sh, its own build folder and 29xxx ports), stopped at the end."""

    def __init__(self, build: Path, security: str) -> None:
        port, controller_port = _free_ports_29xxx(2)
        self.bootstrap = f"127.0.0.1:{port}"
        self.security = security
        self.env = {
            **os.environ,
            "SLUICE_BUILD_DIR": str(build),
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(controller_port),
            "KAFKA_SECURITY": security,
            "KAFKA_SASL_USERNAME": USER,
            "KAFKA_SASL_PASSWORD": PASSWORD,
        }
        self.cafile = build / "kafka" / f"tls-{port}" / "ca.pem"

    def run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(KAFKA_SH), command], env=self.env, capture_output=True, text=True, timeout=120
        )

    def config(
        self, service_config: ServiceConfig, mechanism: str, password: str = PASSWORD
    ) -> ServiceConfig:
        sasl, tls = self.security.startswith("sasl_"), self.security.endswith("ssl")
        return msgspec_replace(
            service_config,
            kafka_bootstrap=self.bootstrap,
            kafka_security_protocol=self.security.upper(),
            kafka_sasl_mechanism=mechanism if sasl else "",
            kafka_sasl_username=USER if sasl else "",
            kafka_sasl_password=password if sasl else "",
            kafka_ssl_cafile=str(self.cafile) if tls else "",
        )


@pytest.fixture(scope="module", params=["sasl_plaintext", "sasl_ssl", "ssl"])
def secure_broker(request, tmp_path_factory):
    build = tmp_path_factory.mktemp(f"kafka-{request.param}")
    (build / "kafka").mkdir()
    libs = sorted((BUILD_DIR / "kafka").glob("libs-*"))
    assert libs, "the broker's jars are fetched by `make test` (deploy/kafka/kafka.sh fetch) first"
    for lib in libs:
        (build / "kafka" / lib.name).symlink_to(lib.resolve())
    broker = SecureBroker(build, request.param)
    started = broker.run("start")
    assert started.returncode == 0, started.stderr
    try:
        yield broker
    finally:
        stopped = broker.run("stop")
        assert stopped.returncode == 0, stopped.stderr


def _job(custom_id: str) -> bytes:
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    return json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": body}).encode()


# SASL_PLAINTEXT: PLAIN and SCRAM-SHA-256; SASL_SSL: SCRAM-SHA-512 over TLS; SSL: TLS alone.
MECHANISMS = {"sasl_plaintext": ["PLAIN", "SCRAM-SHA-256"], "sasl_ssl": ["SCRAM-SHA-512"], "ssl": ["TLS"]}


@pytest.mark.kafka
@pytest.mark.slow
async def test_jobs_round_trip_through_the_service_with_each_sasl_mechanism_and_over_tls(
    secure_broker, service_config, run_service
):
    for mechanism in MECHANISMS[secure_broker.security]:
        config = secure_broker.config(service_config, mechanism)
        prefix = f"{config.group_id}-{mechanism}"  # topics and group of this mechanism's round trip
        config = msgspec_replace(
            config,
            jobs_topics=[f"{prefix}.jobs"],
            results_topic=f"{prefix}.results",
            dlq_topic=f"{prefix}.dlq",
            traces_topic=f"{prefix}.traces",
            group_id=prefix,
        )
        kafka = KafkaClient(config.kafka_bootstrap, client_options(config))
        custom_id = f"{secure_broker.security}-{mechanism}"
        await kafka.post(config.jobs_topics[0], [(custom_id.encode(), _job(custom_id), [])])
        async with run_service(config):
            results = await kafka.read(config.results_topic, 1, timeout=60)
            # `sluice submit`'s clients log in with the same options.
            submitted = await submit_jobs(
                [_job(f"{custom_id}-cli")],
                config.kafka_bootstrap,
                config.jobs_topics[0],
                config.results_topic,
                timeout=60,
                security=client_options(config),
            )
            assert submitted == 0
        answered = [json.loads(r.value) for r in results if r.key == custom_id.encode()]
        assert answered, f"no result for {custom_id}"
        assert answered[0]["error"] is None
        assert answered[0]["response"]["body"]["usage"]["completion_tokens"] == 3


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("secure_broker", ["sasl_plaintext", "sasl_ssl"], indirect=True)
async def test_wrong_password_stops_the_service_with_the_brokers_reason(
    secure_broker, service_config, run_service
):
    mechanism = MECHANISMS[secure_broker.security][-1]
    config = secure_broker.config(service_config, mechanism, password="not-the-password")
    with pytest.raises(
        KafkaLoginError, match=rf"refused the login of '{USER}' \({mechanism}\).*Authentication failed"
    ):
        async with run_service(config):
            pass


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("secure_broker", ["sasl_ssl"], indirect=True)
async def test_an_untrusted_certificate_or_a_plaintext_client_on_a_tls_listener_fail_clearly(secure_broker):
    base = secure_broker.config(ServiceConfig(), "PLAIN")
    untrusted = msgspec_replace(base, kafka_ssl_cafile="")  # the system's CAs do not know our certificate
    with pytest.raises(KafkaLoginError, match=r"TLS handshake .* failed: .*CERTIFICATE_VERIFY_FAILED"):
        await check_login(base.kafka_bootstrap, client_options(untrusted), timeout_s=10)
    no_tls = msgspec_replace(base, kafka_security_protocol="SASL_PLAINTEXT", kafka_ssl_cafile="")
    with pytest.raises(KafkaLoginError, match="does that listener use SASL_PLAINTEXT"):
        await check_login(base.kafka_bootstrap, client_options(no_tls), timeout_s=10)


def msgspec_replace(config: ServiceConfig, **changes) -> ServiceConfig:
    import msgspec

    return msgspec.structs.replace(config, **changes)


def _free_ports_29xxx(count: int) -> list[int]:
    """Free ports in 29000-29999 (the range kept for brokers started by tests)."""
    ports: list[int] = []
    for port in range(29000 + os.getpid() % 900, 30000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports in 29000-29999")


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("secure_broker", ["sasl_plaintext"], indirect=True)
def test_python_m_service_with_a_wrong_password_exits_2_with_the_reason(secure_broker, tiny_checkpoint):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "SLUICE_KAFKA_BOOTSTRAP": secure_broker.bootstrap,
        "SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SLUICE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "SLUICE_KAFKA_SASL_USERNAME": USER,
        "SLUICE_KAFKA_SASL_PASSWORD": "not-the-password",
        "SLUICE_ENGINE_MODEL": str(tiny_checkpoint),
        "SLUICE_ENGINE_KV_CACHE_MEMORY_GIB": "0.25",
        "SLUICE_HTTP_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot connect: Kafka at {secure_broker.bootstrap} refused the login of '{USER}'" in done.stderr
    assert "Traceback" not in done.stderr
