"""TemplateSandbox: a job's own chat template, rendered in worker processes under limits.

A job's `chat_template` is code from Kafka: a 100-byte nested loop runs for hours, a string
multiplied by 10^10 takes all memory. So it never runs on the service's tokenizer thread (which
serves every job) nor in the service's process: a small pool of `service.template_worker`
processes renders it, each render within `chat_template_timeout_s` (or its worker is killed and
replaced), `max_chat_template_memory_bytes` of address space and `max_chat_template_chars` of
output. A render past a limit is the job's PromptError naming the limit (code limit_exceeded,
param chat_template); other jobs go on, on the tokenizer thread and the other workers.

Workers start with `start()` (or on first use), and a new one at once in place of each one
killed; `stop()` kills them all, renders in flight included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import sys
from pathlib import Path

import msgspec

from service.prompts import ChatInputs, PromptError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0  # a worker's interpreter and imports, on a busy machine
_REPO_ROOT = Path(__file__).resolve().parent.parent


class TemplateSandbox:
    def __init__(self, num_workers: int, timeout_s: float, max_memory_bytes: int, max_chars: int) -> None:
        self.timeout_s = timeout_s
        self.max_memory_bytes = max_memory_bytes
        self.max_chars = max_chars
        self._slots: asyncio.Queue[_Worker | None] = asyncio.Queue()
        for _ in range(num_workers):
            self._slots.put_nowait(None)  # started on first use
        self._workers: set[_Worker] = set()
        self._starting: set[asyncio.Future] = set()  # workers starting (_Worker.start)
        self._replacing: set[asyncio.Future] = set()  # starting them in place of killed ones
        self._closing: set[asyncio.Future] = set()  # workers killed, their pipes not yet closed
        self._is_stopped = False
        self.num_killed = 0  # renders whose worker was killed: past a limit, abandoned, or crashed

    async def start(self) -> None:
        """Start every worker now, so that no job waits for one to start (else: on first use)."""
        workers = await asyncio.gather(*(self._take() for _ in range(self._slots.qsize())))
        for worker in workers:
            self._slots.put_nowait(worker)

    async def render(self, chat: ChatInputs, special_tokens: dict[str, object]) -> str:
        """The chat as its template (`chat.template`) renders it, with the tokenizer's special
        tokens (bos_token, eos_token, ...) as variables, as apply_chat_template has them.

        PromptError: limit_exceeded (param chat_template) past a limit, invalid_request where the
        template raised. A cancelled render kills its worker."""
        request = msgspec.msgpack.encode(
            {
                "template": chat.template,
                "messages": chat.messages,
                "kwargs": {**special_tokens, **chat.template_kwargs()},
            },
            enc_hook=str,  # a special token given as an AddedToken: its text
        )
        worker = await self._take()
        try:
            answer = await worker.ask(request, self.timeout_s)
        except TimeoutError:
            self._kill(worker)
            raise self._limit("took longer than", f"{self.timeout_s:g}s", "chat_template_timeout_s") from None
        except (asyncio.IncompleteReadError, ConnectionError):
            self._kill(worker)
            code = worker.process.returncode
            raise PromptError(
                "limit_exceeded",
                f"chat_template: the render ended its sandbox process (exit status {code})",
                "chat_template",
            ) from None
        except BaseException:  # cancelled (the job was aborted, the service stops): the render is abandoned
            self._kill(worker)
            raise
        if (limit := answer.get("limit")) == "memory":
            self._kill(worker)  # its heap is in no known state
            memory = f"{self.max_memory_bytes} bytes of memory"
            raise self._limit("needed more than", memory, "max_chat_template_memory_bytes")
        self._slots.put_nowait(worker)
        if limit == "output":
            characters = f"{self.max_chars} characters"
            raise self._limit("wrote more than", characters, "max_chat_template_chars")
        if "error" in answer:
            raise PromptError(
                "invalid_request", f"the chat template rejected the messages: {answer['error']}"
            )
        return answer["text"]

    @staticmethod
    def _limit(what: str, limit: str, option: str) -> PromptError:
        message = f"chat_template: the render {what} this service's limit of {limit} ({option})"
        return PromptError("limit_exceeded", message, "chat_template")

    async def stop(self) -> None:
        """Kill every worker, starting, rendering or idle; a render in flight ends with a PromptError."""
        self._is_stopped = True
        for starting in list(self._starting):
            starting.cancel()  # a worker still starting is closed by its start
        await asyncio.gather(*self._starting, *self._replacing, return_exceptions=True)
        for worker in list(self._workers):
            self._close(worker)
        for _ in range(len(self._closing) + 1):
            self._slots.put_nowait(None)  # renders waiting for a worker see that there are none
        while self._closing:  # a render the kills end closes its worker again: those too
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def _take(self) -> _Worker:
        worker = await self._slots.get()
        if self._is_stopped:
            raise RuntimeError("the template sandbox is stopped")
        if worker is not None and worker.process.returncode is None:
            return worker
        if worker is not None:  # it died idle
            self._close(worker)
        try:
            return await self._start_worker()
        except BaseException:
            self._slots.put_nowait(None)
            raise

    async def _start_worker(self) -> _Worker:
        starting = asyncio.ensure_future(_Worker.start(self.max_memory_bytes, self.max_chars))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)
        try:
            worker = await starting
        except asyncio.CancelledError:
            if self._is_stopped and not asyncio.current_task().cancelling():  # stop() cancelled the start
                raise RuntimeError("the template sandbox is stopped") from None
            raise
        if self._is_stopped:  # stop() came while it started
            self._close(worker)
            raise RuntimeError("the template sandbox is stopped")
        self._workers.add(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        """Kill the worker (its render is abandoned) and start its replacement in the background."""
        self.num_killed += 1
        self._close(worker)
        if not self._is_stopped:
            replacing = asyncio.ensure_future(self._replace())
            self._replacing.add(replacing)
            replacing.add_done_callback(self._replacing.discard)

    def _close(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        closing = asyncio.ensure_future(worker.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _replace(self) -> None:
        try:
            worker = await self._start_worker()
        except asyncio.CancelledError:  # the sandbox stops
            return
        except Exception:  # the next render that takes the slot tries again (none: the sandbox stopped)
            if self._is_stopped:
                return
            log.exception("a template sandbox process did not start")
            self._slots.put_nowait(None)
            return
        self._slots.put_nowait(worker)


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process, transport: asyncio.SubprocessTransport) -> None:
        self.process = process
        self._transport = transport

    @classmethod
    async def start(cls, max_memory_bytes: int, max_chars: int) -> _Worker:
        path = os.pathsep.join(p for p in [str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
        # none of the service's environment (SLUICE_KAFKA_SASL_PASSWORD and the like)
        env = {"PYTHONPATH": path, "PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        loop = asyncio.get_running_loop()
        # asyncio.create_subprocess_exec, keeping the transport: close() closes it once the process is gone
        transport, protocol = await loop.subprocess_exec(
            lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=2**16, loop=loop),
            sys.executable,
            "-m",
            "service.template_worker",
            str(max_memory_bytes),
            str(max_chars),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            env=env,
            cwd="/",
        )
        worker = cls(asyncio.subprocess.Process(transport, protocol, loop), transport)
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                ready = await worker._read()
            if not ready.get("ready"):
                raise RuntimeError(f"a template sandbox process did not start: {ready!r}")
        except BaseException:  # failed, or cancelled (the sandbox stops)
            await asyncio.shield(worker.close())
            raise
        log.info("template sandbox process %d started", worker.process.pid)
        return worker

    async def close(self) -> None:
        """Kill it (if it runs), wait for its exit and close its pipes."""
        with contextlib.suppress(ProcessLookupError):
            if self.process.returncode is None:
                self.process.kill()
        await self.process.wait()
        self._transport.close()
        await asyncio.sleep(0)  # the pipes' own closing runs on the loop

    async def ask(self, request: bytes, timeout_s: float) -> dict:
        self.process.stdin.write(struct.pack(">I", len(request)) + request)
        async with asyncio.timeout(timeout_s):
            await self.process.stdin.drain()
            return await self._read()

    async def _read(self) -> dict:
        (size,) = struct.unpack(">I", await self.process.stdout.readexactly(4))
        return msgspec.msgpack.decode(await self.process.stdout.readexactly(size))
