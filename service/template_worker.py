"""A chat-template sandbox process: `python -m service.template_worker MAX_MEMORY_BYTES MAX_CHARS`.

Renders a job's own chat template as Transformers renders it (its ImmutableSandboxedEnvironment,
filters and globals: render_jinja_template), with the address space it may grow by and the
characters it may write bounded; the service (service/template_sandbox.py) bounds its time by
killing it. Requests come on stdin and answers go to stdout, each a 4-byte big-endian length and a
MessagePack map. The process dies with its parent, runs at a lower priority than the service, may
start no processes, sees none of the service's environment (its Kafka credentials), and exits
after a render that ran out of memory (its heap is left in no known state).

Imports nothing of Sluice: it runs untrusted templates and keeps to jinja2 and Transformers'
template utilities.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import struct
import sys
from typing import Any, BinaryIO

import msgspec

_PR_SET_PDEATHSIG = 1


class OutputTooLarge(Exception):
    pass


def main(argv: list[str]) -> int:
    max_memory_bytes, max_chars = int(argv[1]), int(argv[2])
    _die_with_parent()
    os.nice(10)
    out = os.fdopen(os.dup(1), "wb")  # answers; anything else printed goes to stderr
    os.dup2(2, 1)
    from transformers.utils import chat_template_utils

    _limit_resources(max_memory_bytes)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    _write(out, encoder.encode({"ready": True}))
    while (frame := _read(sys.stdin.buffer)) is not None:
        answer = _render(chat_template_utils, decoder.decode(frame), max_chars)
        _write(out, encoder.encode(answer))
        if answer.get("limit") == "memory":
            return 0
    return 0


def _render(utils, request: dict[str, Any], max_chars: int) -> dict[str, Any]:
    """{"text": ...}, or {"limit": "memory" | "output"}, or {"error": ...}."""
    template = request["template"]
    try:
        compiled = utils._compile_jinja_template(template)  # cached per template, as Transformers does
        compiled.environment.concat = _bounded_concat(max_chars)
        rendered, _ = utils.render_jinja_template(
            conversations=[request["messages"]], chat_template=template, **request["kwargs"]
        )
        return {"text": rendered[0]}
    except MemoryError:
        return {"limit": "memory"}
    except OutputTooLarge:
        return {"limit": "output"}
    except RecursionError:
        return {"error": "the template recursed too deeply"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def _bounded_concat(max_chars: int):
    """Jinja joins a template's output (and every block's) with `environment.concat`: this one
    stops a render as soon as it has written more than `max_chars`."""

    def concat(chunks) -> str:
        parts, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > max_chars:
                raise OutputTooLarge
            parts.append(chunk)
        return "".join(parts)

    return concat


def _limit_resources(max_memory_bytes: int) -> None:
    # the address space it has now (the interpreter and its imports), plus what a render may take
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = size + max_memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # and no processes of its own, should a template ever get out of Jinja's sandbox (root ignores this)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _die_with_parent() -> None:
    # a render stuck in a loop must not outlive a service that was killed
    # not Linux: the service still kills it at its time limit and when it stops
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _read(stream: BinaryIO) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None  # the service closed the pipe: done
    (size,) = struct.unpack(">I", head)
    return stream.read(size)


def _write(stream: BinaryIO, payload: bytes) -> None:
    stream.write(struct.pack(">I", len(payload)) + payload)
    stream.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
