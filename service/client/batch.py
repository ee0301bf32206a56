"""`sluice batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch input file in, its output file out.

A drop-in for `vllm run-batch -i INPUT -o OUTPUT` (and OpenAI's batch endpoint): the jobs go as
they are, one output line per input line in the output format, failed lines with their error.
Each job travels under a run-scoped custom_id and gets its own custom_id back in the output.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from schemas.batch import BatchResponseLine
from schemas.codec import JobDecodeError
from service.client.command import RunFiles, add_run_arguments, execute_run
from service.client.driver import WorkItem
from service.client.inputs import read_batch_lines
from service.client.outputs import BatchOutput
from service.config import ServiceConfig
from service.translate import to_decode_error_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="an OpenAI Batch input file (JSONL)")
    parser.add_argument("output", type=Path, help="the OpenAI Batch output file (JSONL, appended to)")
    add_run_arguments(parser)


async def run_batch(args: argparse.Namespace, config: ServiceConfig) -> int:
    output = BatchOutput(args.output)

    def items() -> Iterator[WorkItem]:
        for line in read_batch_lines(args.input):
            # the error line the service writes for these bytes: its code, message and param
            error = None if line.error is None else (line.error.code, line.error.message, line.error.param)
            yield WorkItem(line.custom_id, line.custom_id, line.job, error)

    run = RunFiles(
        "batch",
        output,
        args.output.with_name(args.output.name + ".run"),
        items,
        lambda key, row_id, result: msgspec.structs.replace(result, custom_id=key),
        _failure_record,
        lambda: None,
    )
    return await execute_run(run, args, config)


def _failure_record(key: str, row_id: Any, code: str, message: str, param: str | None) -> BatchResponseLine:
    return to_decode_error_line(key, JobDecodeError(code, message, param))
