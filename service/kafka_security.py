"""How Sluice authenticates to Kafka: SASL (PLAIN, SCRAM-SHA-256/512) and TLS.

Every aiokafka client the service creates (the jobs consumer, the results producer, the
topic admin, `sluice submit`'s clients) takes its security settings from one place:
`client_options(config)`, whose dict is splatted into the client's constructor. The
configuration is checked when it is built (`check`), so a half-configured cluster login
stops start-up with a message that names the option instead of a refused connection later.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from aiokafka.helpers import create_ssl_context

SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

KafkaClientOptions = dict[str, Any]  # keyword arguments of AIOKafkaConsumer/Producer/AdminClient


class KafkaSecuritySettings(Protocol):
    """The options this module reads (read-only); ServiceConfig has them (service/config.py)."""

    @property
    def kafka_security_protocol(self) -> str: ...

    @property
    def kafka_sasl_mechanism(self) -> str: ...

    @property
    def kafka_sasl_username(self) -> str: ...

    @property
    def kafka_sasl_password(self) -> str: ...

    @property
    def kafka_ssl_cafile(self) -> str: ...

    @property
    def kafka_ssl_certfile(self) -> str: ...

    @property
    def kafka_ssl_keyfile(self) -> str: ...

    @property
    def kafka_ssl_password(self) -> str: ...

    @property
    def kafka_ssl_check_hostname(self) -> bool: ...


class KafkaLoginError(RuntimeError):
    """The broker refused our credentials or our TLS handshake: retrying will not help."""


def check(config: KafkaSecuritySettings) -> None:
    """Raise ValueError naming the option when the security settings cannot work together."""
    protocol = config.kafka_security_protocol
    uses_sasl, uses_tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
    if uses_sasl:
        if not config.kafka_sasl_mechanism:
            raise ValueError(
                f"kafka_security_protocol={protocol} needs kafka_sasl_mechanism "
                f"({', '.join(SASL_MECHANISMS)})"
            )
        missing = [n for n in ("kafka_sasl_username", "kafka_sasl_password") if not getattr(config, n)]
        if missing:
            raise ValueError(
                f"kafka_sasl_mechanism={config.kafka_sasl_mechanism} needs credentials: "
                f"{' and '.join(missing)} must be set ({', '.join('SLUICE_' + n.upper() for n in missing)})"
            )
    else:
        stray = [n for n in ("kafka_sasl_mechanism", "kafka_sasl_username") if getattr(config, n)]
        if stray:
            raise ValueError(
                f"{stray[0]} is set but kafka_security_protocol={protocol} does not use SASL; "
                "use SASL_PLAINTEXT or SASL_SSL"
            )
    tls_files = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    if not uses_tls:
        if stray := [n for n in tls_files if getattr(config, n)]:
            raise ValueError(
                f"{stray[0]} is set but kafka_security_protocol={protocol} does not use TLS; "
                "use SSL or SASL_SSL"
            )
        return
    for name in tls_files:
        if (path := getattr(config, name)) and not Path(path).is_file():
            raise ValueError(f"{name}: no such file {path!r}")
    if config.kafka_ssl_keyfile and not config.kafka_ssl_certfile:
        raise ValueError("kafka_ssl_keyfile is set without kafka_ssl_certfile (the client certificate)")


def client_options(config: KafkaSecuritySettings) -> KafkaClientOptions:
    """The security keyword arguments for an aiokafka client (empty for plain PLAINTEXT)."""
    protocol = config.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: KafkaClientOptions = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        options.update(
            sasl_mechanism=config.kafka_sasl_mechanism,
            sasl_plain_username=config.kafka_sasl_username,  # aiokafka uses these for SCRAM too
            sasl_plain_password=config.kafka_sasl_password,
        )
    if protocol.endswith("SSL"):
        options["ssl_context"] = _ssl_context(config)
    return options


async def check_login(bootstrap: str, options: KafkaClientOptions, timeout_s: float = 30) -> None:
    """Connect to the first bootstrap broker that answers and log in as the clients will.

    aiokafka's clients only say "Unable to bootstrap" when a login fails; this says why
    (KafkaLoginError). A broker that cannot be reached is left to the clients to report.
    """
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            conn = await create_conn(host, int(port), request_timeout_ms=int(timeout_s * 1000), **options)
        except SaslAuthenticationFailed as e:
            user, mechanism = options.get("sasl_plain_username"), options.get("sasl_mechanism")
            raise KafkaLoginError(
                f"Kafka at {address} refused the login of {user!r} ({mechanism}): {e}"
            ) from None
        except ssl.SSLError as e:
            raise KafkaLoginError(f"TLS handshake with Kafka at {address} failed: {e}") from None
        except KafkaConnectionError as e:
            protocol = options.get("security_protocol", "PLAINTEXT")
            raise KafkaLoginError(
                f"Kafka at {address} closed the connection during the {protocol} handshake ({e}); "
                f"does that listener use {protocol}?"
            ) from None
        except (OSError, TimeoutError):
            continue  # try the next bootstrap broker
        conn.close()
        return


def _ssl_context(config: KafkaSecuritySettings) -> ssl.SSLContext:
    # No cafile: the system's trusted CAs, as for any TLS client.
    context = create_ssl_context(
        cafile=config.kafka_ssl_cafile or None,
        certfile=config.kafka_ssl_certfile or None,
        keyfile=config.kafka_ssl_keyfile or None,
        password=config.kafka_ssl_password or None,
    )
    context.check_hostname = config.kafka_ssl_check_hostname
    return context
