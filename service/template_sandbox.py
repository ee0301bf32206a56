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
        self._replacing: set[asyncio.Future] = set()  # workers starting in place of killed ones
        self._is_stopped = False
        self.num_killed = 0  # workers killed for a limit, a cancelled render or a crash

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
        """Kill every worker, rendering or not; a render in flight ends with a PromptError."""
        self._is_stopped = True
        for replacing in list(self._replacing):
            replacing.cancel()  # a worker still starting is killed by its start
        await asyncio.gather(*self._replacing, return_exceptions=True)
        for worker in list(self._workers):
            worker.kill()
        await asyncio.gather(*(w.process.wait() for w in list(self._workers)), return_exceptions=True)

    async def _take(self) -> _Worker:
        if self._is_stopped:
            raise RuntimeError("the template sandbox is stopped")
        worker = await self._slots.get()
        if worker is not None and worker.process.returncode is None:
            return worker
        try:
            return await self._start_worker()
        except BaseException:
            self._slots.put_nowait(None)
            raise

    async def _start_worker(self) -> _Worker:
        worker = await _Worker.start(self.max_memory_bytes, self.max_chars)
        self._workers.add(worker)
        worker.process_done = asyncio.ensure_future(worker.process.wait())
        worker.process_done.add_done_callback(lambda _: self._workers.discard(worker))
        return worker

    def _kill(self, worker: _Worker) -> None:
        """Kill the worker (its render is abandoned) and start its replacement in the background."""
        if worker.kill():
            self.num_killed += 1
        if self._is_stopped:
            return
        replacing = asyncio.ensure_future(self._replace())
        self._replacing.add(replacing)
        replacing.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        try:
            worker = await self._start_worker()
        except Exception:  # the next render that takes the slot tries again
            log.exception("a template sandbox process did not start")
            self._slots.put_nowait(None)
            return
        self._slots.put_nowait(worker)


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.process_done: asyncio.Future | None = None

    @classmethod
    async def start(cls, max_memory_bytes: int, max_chars: int) -> _Worker:
        path = os.pathsep.join(p for p in [str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
        # none of the service's environment (SLUICE_KAFKA_SASL_PASSWORD and the like)
        env = {"PYTHONPATH": path, "PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.template_worker",
            str(max_memory_bytes),
            str(max_chars),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
        )
        worker = cls(process)
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                ready = await worker._read()
            if not ready.get("ready"):
                raise RuntimeError(f"a template sandbox process did not start: {ready!r}")
        except BaseException:  # failed, or cancelled (the sandbox stops): gone before its transport is
            worker.kill()
            await asyncio.shield(process.wait())
            raise
        log.info("template sandbox process %d started", process.pid)
        return worker

    def kill(self) -> bool:
        """Whether it was running."""
        self.process.stdin.close()  # the last pipe open: its transport closes once the process is gone
        if self.process.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        return True

    async def ask(self, request: bytes, timeout_s: float) -> dict:
        self.process.stdin.write(struct.pack(">I", len(request)) + request)
        async with asyncio.timeout(timeout_s):
            await self.process.stdin.drain()
            return await self._read()

    async def _read(self) -> dict:
        (size,) = struct.unpack(">I", await self.process.stdout.readexactly(4))
        return msgspec.msgpack.decode(await self.process.stdout.readexactly(size))
