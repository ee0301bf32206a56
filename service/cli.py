"""The `sluice` command: `sluice serve` runs the service; `sluice submit` posts jobs and prints their results;
`sluice label` labels a dataset; `sluice batch` runs an OpenAI Batch file (a drop-in for `vllm run-batch`).

The three clients live in service/client/; this module only parses the command line and dispatches."""

from __future__ import annotations

import argparse
import asyncio
import sys

from service.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service in the foreground (same as python -m service)")
    from service.client import batch, label, submit

    submit.add_arguments(
        commands.add_parser(
            "submit", help="post OpenAI Batch input lines as jobs and print their result lines"
        )
    )
    label.add_arguments(commands.add_parser("label", help="label a dataset (JSONL, CSV, Parquet) row by row"))
    batch.add_arguments(
        commands.add_parser("batch", help="run an OpenAI Batch input file, write its output file")
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        from service.__main__ import main as serve_main

        return serve_main()
    try:
        config = load_config()
    except ConfigError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    if args.command == "submit":
        return submit.run_submit(args, config)
    return _run_file(args, config)


def _run_file(args: argparse.Namespace, config) -> int:
    """`sluice label` / `sluice batch`: bad input or options end with a message and exit code 2."""
    from aiokafka.errors import KafkaError

    from service.client import batch, label
    from service.client.inputs import InputError
    from service.client.ledger import LedgerError
    from service.client.outputs import OutputError

    _quiet_libraries(args.local)
    try:
        config = _with_adapters(args, config)
    except ConfigError as e:
        print(f"sluice {args.command}: {e}", file=sys.stderr)
        return 2
    run = label.run_label if args.command == "label" else batch.run_batch
    try:
        return asyncio.run(run(args, config))
    except (InputError, OutputError, LedgerError, ValueError, OSError) as e:
        print(f"sluice {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sluice {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except KafkaError as e:
        print(
            f"sluice {args.command}: Kafka at {args.bootstrap or config.kafka_bootstrap}: {e!r}",
            file=sys.stderr,
        )
        return 1


def _with_adapters(args: argparse.Namespace, config):
    """The configuration with the `--lora NAME=PATH` adapters added to the engine's (--local only)."""
    if not args.lora:
        return config
    if not args.local:
        raise ConfigError("--lora needs --local: the service serves the adapters of its own configuration")
    import dataclasses

    import msgspec

    from engine.config import EngineConfigError
    from service.config import parse_pairs

    adapters = {**config.engine.lora_adapters, **parse_pairs(args.lora)}
    try:
        engine = dataclasses.replace(config.engine, lora_adapters=adapters)
        return msgspec.structs.replace(config, engine=engine)
    except (EngineConfigError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _quiet_libraries(local: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if local:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
