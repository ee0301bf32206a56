"""Token embedding and LM head, with the vocabulary split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.tp import all_gather, all_reduce, get_tp_rank, get_tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [vocab_start, vocab_end) of the table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, shared_weight: nn.Parameter | None = None):
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        if num_embeddings % self.tp_size:
            raise ValueError(f"vocab_size ({num_embeddings}) is not divisible by {self.tp_size}")
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = num_embeddings // self.tp_size
        self.vocab_start_idx = self.num_embeddings_per_partition * self.tp_rank
        self.vocab_end_idx = self.vocab_start_idx + self.num_embeddings_per_partition
        if shared_weight is not None:
            self.weight = shared_weight  # tied: the other module's parameter and loader
            return
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        expected = (self.num_embeddings, param.size(1))
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected {expected}")
        param.data.copy_(loaded_weight.narrow(0, self.vocab_start_idx, self.num_embeddings_per_partition))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T] token ids -> [T, embedding_dim]
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        # tensor parallel: rows owned by another rank come out zero here and from it in the sum
        mask = (x >= self.vocab_start_idx) & (x < self.vocab_end_idx)
        y = F.embedding(mask * (x - self.vocab_start_idx), self.weight)
        return all_reduce(mask.unsqueeze(1) * y)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the full vocabulary; each rank computes its slice of the vocab.

    With tie_word_embeddings pass the embedding's parameter as `shared_weight`: one tensor,
    loaded once (from embed_tokens.weight). On CPU `engine.layers.packed_linear` may set
    `matmul` to one over a oneDNN-packed copy of the weight.
    """

    matmul = None  # x -> x W^T; None: F.linear with `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, embedding_dim] -> [N, num_embeddings]
        logits = F.linear(x, self.weight) if self.matmul is None else self.matmul(x)
        return all_gather(logits, dim=-1)


def lm_heads(model: nn.Module) -> list[tuple[ParallelLMHead, bool]]:
    """The model's LM heads (none on a pipeline stage before the last), each with whether it is
    tied to the embedding's table (which the lookup keeps reading as it is)."""
    lookup_tables = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    return [(m, id(m.weight) in lookup_tables) for m in model.modules() if isinstance(m, ParallelLMHead)]
