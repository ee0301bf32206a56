"""The engine benchmarks' workloads and result rows (token ids only: every engine sees the same prompts)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


@dataclass(slots=True)
class Row:
    mode: str
    seconds: float
    output_tokens: int
    steps: int | None = None  # engine steps the run took, where the engine says
    # what the linear layers compute in, for the floor it is measured against (loadtest/floor.py):
    # "float", "int8" (W8A8 projections, float LM head) or "int8+head" (the head too)
    arithmetic: str = "float"

    @property
    def ms_per_step(self) -> float | None:
        return None if not self.steps else 1000 * self.seconds / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def standard_workload(vocab_size: int, num_requests: int = 64, seed: int = 0) -> Workload:
    """Prompts of 32-512 tokens, outputs of 16-128, drawn with a fixed seed."""
    return _random_workload("standard", vocab_size, num_requests, seed, (32, 512), (16, 128))


def shared_prefix_workload(
    vocab_size: int, num_requests: int = 64, prefix_len: int = 256, seed: int = 0
) -> Workload:
    """A 256-token instruction shared by every prompt, 32-256 tokens of its own, 4-16 output tokens."""
    rng = random.Random(seed)
    instruction = [1] + [rng.randrange(4, vocab_size) for _ in range(prefix_len - 1)]
    prompts, output_lens = [], []
    for _ in range(num_requests):
        own = [rng.randrange(4, vocab_size) for _ in range(rng.randint(32, 256))]
        prompts.append(instruction + own)
        output_lens.append(rng.randint(4, 16))
    return Workload("shared-prefix", prompts, output_lens)


def decode_workload(vocab_size: int, num_requests: int = 128, seed: int = 0) -> Workload:
    """Prompts of 16-64 tokens, outputs of 128-256: nearly every step decodes every request. On
    the `micro` checkpoint a step's arithmetic is negligible and its time is the host's work."""
    return _random_workload("decode", vocab_size, num_requests, seed, (16, 64), (128, 256))


def _random_workload(
    name: str,
    vocab_size: int,
    num_requests: int,
    seed: int,
    prompt_lens: tuple[int, int],
    output_lens: tuple[int, int],
) -> Workload:
    """BOS then random tokens, each length drawn (inclusive) from its range with a fixed seed."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num_requests):
        length = rng.randint(*prompt_lens)
        prompts.append([1] + [rng.randrange(4, vocab_size) for _ in range(length - 1)])
        outputs.append(rng.randint(*output_lens))
    return Workload(name, prompts, outputs)


WORKLOADS = {
    "standard": standard_workload,
    "shared-prefix": shared_prefix_workload,
    "decode": decode_workload,
}
