"""Triton kernels on CPU: Triton's interpreter must be switched on before triton is imported, so
each check runs as a script in a fresh Python process with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from engine.forward_context import AttentionMetadata, group_by_length

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(code: str, timeout: float = 600) -> str:
    """Run the script (dedented) under Triton's interpreter; its stdout, or the test fails with its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def decode_metadata(lens: list[int], block_tables: torch.Tensor) -> AttentionMetadata:
    """A decode-only step's metadata (one new token per sequence) over the given block tables, for
    the scripts that compare a decode kernel with the SDPA backend's decode."""
    return AttentionMetadata(
        query_lens=[1] * len(lens),
        context_lens=lens,
        cu_query_lens=None,
        cu_context_lens=None,
        context_lens_tensor=torch.tensor(lens, dtype=torch.int32),
        slot_mapping=None,
        block_tables=block_tables,
        max_query_len=1,
        max_context_len=max(lens),
        is_decode_only=True,
        decode_groups=group_by_length(lens, "cpu"),
    )
