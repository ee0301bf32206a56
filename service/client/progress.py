"""The live progress bar and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from collections import Counter

from tqdm import tqdm

MAX_LABELS_SHOWN = 10
MAX_FAILED_SHOWN = 20


class RunProgress:
    """rows done/total, rows/s and ETA (tqdm's own), output tokens/s and the error count."""

    def __init__(self, total: int, done: int, errors: int, enabled: bool = True) -> None:
        self.errors = errors
        self.tokens = 0
        self._started = time.monotonic()
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="row",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._postfix()

    def update(self, rows: int, tokens: int, errors: int) -> None:
        self.tokens += tokens
        self.errors += errors
        self._postfix()
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()

    def _postfix(self) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s, {self.errors} errors", refresh=False)


def summary(
    total: int,
    done: int,
    labels: Counter[str] | None,
    errors: dict[str, str],
    written: int,
    output_tokens: int,
    seconds: float,
    pending: list[str],
    idle_timeout: float,
) -> str:
    """What the run did: rows, throughput, label distribution, failed and unanswered rows."""
    lines = [f"rows: {done} of {total} written ({written} by this run), {len(errors)} failed"]
    if seconds > 0 and written:
        lines.append(
            f"throughput: {written / seconds:.1f} rows/s, {output_tokens / seconds:.1f} output tokens/s "
            f"({written} rows, {output_tokens} tokens in {seconds:.1f}s)"
        )
    if labels:
        counted = sum(labels.values())
        shown = ", ".join(
            f"{_short(label)!r} {n} ({100 * n / counted:.1f}%)"
            for label, n in labels.most_common(MAX_LABELS_SHOWN)
        )
        more = f" and {len(labels) - MAX_LABELS_SHOWN} more" if len(labels) > MAX_LABELS_SHOWN else ""
        lines.append(f"labels ({len(labels)} distinct): {shown}{more}")
    if errors:
        lines.append(f"failed rows ({len(errors)}; rerun with --retry-errors to retry them):")
        for key, error in list(errors.items())[:MAX_FAILED_SHOWN]:
            lines.append(f"  {key}: {_short(error, 200)}")
        if len(errors) > MAX_FAILED_SHOWN:
            lines.append(f"  ... and {len(errors) - MAX_FAILED_SHOWN} more (see the output's error column)")
    if pending:
        lines.append(
            f"unanswered: {len(pending)} rows got no result within {idle_timeout:.0f}s of the last one "
            f"(e.g. {', '.join(pending[:5])}); is the service running? Rerun the same command to keep "
            "waiting for them (--repost-pending posts them again)"
        )
    return "\n".join(lines)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
