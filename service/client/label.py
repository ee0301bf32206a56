"""`sluice label INPUT --template T --output OUT`: one labelling job per dataset row, one output line per row."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.client.command import RunFiles, add_run_arguments, execute_run
from service.client.driver import WorkItem
from service.client.inputs import FORMATS, input_format, read_rows
from service.client.outputs import OUTPUT_FORMATS, LabelOutput, label_record, output_format
from service.client.templates import JobSpec, PromptTemplate, TemplateError
from service.config import ServiceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="rows to label: .jsonl, .csv or .parquet")
    parser.add_argument(
        "--template",
        required=True,
        help="the prompt: Jinja2 ({{ field }}) or str.format ({field}) over the row's columns; @FILE reads it from FILE",
    )
    parser.add_argument(
        "--template-format",
        choices=["auto", "jinja", "format"],
        default="auto",
        help="auto (default): Jinja2 when the template has {{ or {%%, else str.format",
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="results: .jsonl or .csv (appended to)"
    )
    parser.add_argument(
        "--choices", help="comma-separated labels; the answer is one of them, with its probability"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="most output tokens per row (default 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    parser.add_argument(
        "--id-column", help="the column that identifies a row (default: the row number, from 0)"
    )
    parser.add_argument("--model", help="the body's model field (default: the configured served model name)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="chat jobs: the prompt is a user message, "
        "rendered with the model's chat template (/v1/chat/completions)",
    )
    parser.add_argument("--system", help="a system message for --chat jobs")
    parser.add_argument(
        "--save-logprobs",
        type=int,
        metavar="K",
        help="store every generated token's log-probability and its top-K alternatives (0-20) in a "
        "`logprobs` field: a teacher signal for distillation",
    )
    parser.add_argument("--input-format", choices=FORMATS, help="default: from the input's suffix")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, help="default: csv for .csv, else jsonl")
    add_run_arguments(parser)


async def run_label(args: argparse.Namespace, config: ServiceConfig) -> int:
    text = Path(args.template[1:]).read_text() if args.template.startswith("@") else args.template
    template = PromptTemplate(text, args.template_format)
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if args.save_logprobs is not None and not 0 <= args.save_logprobs <= 20:
        raise ValueError("--save-logprobs takes 0 to 20 alternatives")
    choices = [c.strip() for c in args.choices.split(",") if c.strip()] if args.choices else []
    spec = JobSpec(
        model=args.model or config.served_model_name,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        choices=choices,
        chat=args.chat,
        system=args.system,
        logprobs=args.save_logprobs,
    )
    fmt = input_format(args.input, args.input_format)
    with_logprobs = args.save_logprobs is not None
    output = LabelOutput(args.output, output_format(args.output, args.output_format), with_logprobs)

    def items() -> Iterator[WorkItem]:
        for row in read_rows(args.input, fmt, args.id_column):
            if row.error is not None:
                yield WorkItem(
                    row.key, row.row_id, None, ("invalid_row", f"row {row.number}: {row.error}", None)
                )
                continue
            try:
                prompt = template.render(row.fields)
            except TemplateError as e:
                yield WorkItem(row.key, row.row_id, None, ("invalid_row", f"row {row.number}: {e}", None))
                continue
            yield WorkItem(row.key, row.row_id, spec.job("", prompt))

    run = RunFiles(
        "label",
        output,
        args.output.with_name(args.output.name + ".run"),
        items,
        lambda key, row_id, result: label_record(row_id, result, args.save_logprobs),
        _failure_record,
        lambda: output.labels,
    )
    return await execute_run(run, args, config)


def _failure_record(key: str, row_id: Any, code: str, message: str, param: str | None) -> dict[str, Any]:
    return {"row_id": row_id, "label": None, "probabilities": None, "error": f"{code}: {message}"}
