"""Quality of a compressed model against a reference: teacher-forced next-token statistics.

The text is fed through the engine's own paged-KV path in chunks (prefill chunks that read
the earlier tokens back from the cache), so a quantised KV cache is measured too. Windows
are independent: each starts with an empty cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.core.scheduler import SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.step_plan import StepPlan
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class QualityReport:
    perplexity: float  # of the compared model on the text
    perplexity_ratio: float  # its perplexity / the reference's
    greedy_agreement: float  # share of positions where both models' argmax is the same token
    kl_divergence: float  # mean KL(reference || compared) of the next-token distributions, in nats
    num_positions: int


@torch.inference_mode()
def teacher_forced_logits(engine, token_ids: list[int], window: int = 256, chunk: int = 32) -> torch.Tensor:
    """Logits [N, V] (float32, CPU) predicting token_ids[1:N+1], N = len(token_ids) - 1 rounded to windows.

    Each window of `window` tokens is one sequence, run `chunk` tokens per step.
    """
    runner, rows = engine.runner, []
    for start in range(0, len(token_ids) - window, window):
        seq = Sequence("quality", token_ids[start : start + window], SamplingParams(max_tokens=1), 1)
        engine.block_manager.allocate(seq, window)
        try:
            while seq.num_computed_tokens < window:
                n = min(chunk, window - seq.num_computed_tokens)
                out = SchedulerOutput(seqs=[seq], num_new_tokens=[n], is_sampling=[False])
                plan = StepPlan.build(
                    out, engine.vocab_size, released_seq_ids=engine.block_manager.take_released()
                )
                logits = runner.compute_all_logits(plan)
                rows.append(logits.float().cpu())
                seq.num_computed_tokens += n
        finally:
            engine.block_manager.deallocate(seq)
    return torch.cat(rows)


def targets_for(token_ids: list[int], window: int = 256) -> torch.Tensor:
    """The token each row of teacher_forced_logits predicts (the last of a window predicts the next window's first)."""
    ids = [token_ids[start + 1 : start + window + 1] for start in range(0, len(token_ids) - window, window)]
    return torch.tensor([t for w in ids for t in w])


def compare(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> QualityReport:
    """reference, logits [N, V]; targets [N] -> QualityReport of `logits` against `reference`."""
    ref_logp = F.log_softmax(reference.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_nll = -ref_logp.gather(1, targets[:, None]).mean()
    nll = -logp.gather(1, targets[:, None]).mean()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).mean()
    agreement = (reference.argmax(dim=-1) == logits.argmax(dim=-1)).float().mean()
    return QualityReport(
        perplexity=float(nll.exp()),
        perplexity_ratio=float((nll - ref_nll).exp()),
        greedy_agreement=float(agreement),
        kl_divergence=float(kl),
        num_positions=int(targets.numel()),
    )
