"""The embedding table and the LM head, split by vocabulary rows over the TP group.

Both shard alike (``VocabShard``), so an LM head tied to the embedding reads the same
rows. With one rank they are the plain embedding and output projection.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srt.layers.cpu_weight_packing import PackableWeight
from srt.layers.weight_shards import loadable_param, shape_of
from srt.platform.distributed import TPGroup


class VocabShard:
    """This rank's contiguous block of vocabulary rows (the vocabulary is padded to split evenly)."""

    def __init__(self, vocab_size: int, tp_group: TPGroup) -> None:
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp_group.size)
        self.start = tp_group.rank * self.rows

    def load(self, param: nn.Parameter, loaded: Any) -> None:
        end = min(self.start + self.rows, shape_of(loaded)[0])
        param.data.zero_()
        if end > self.start:
            param.data[: end - self.start].copy_(torch.as_tensor(loaded[self.start : end]))


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows; ids outside a rank's rows contribute zeros.

    ``embed_scale`` keeps the scaling that some models (Gemma) build into their
    embedding module.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tp_group: TPGroup,
        embed_scale: torch.Tensor | float | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group = tp_group
        self.shard = VocabShard(num_embeddings, tp_group)
        self.weight = loadable_param((self.shard.rows, embedding_dim), dtype, device, self.shard.load)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.shard.start
            outside = (local < 0) | (local >= self.shard.rows)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = self.tp_group.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))
        if self.embed_scale is not None:
            out = out * torch.as_tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out


class ParallelLMHead(PackableWeight, nn.Module):
    """The output projection split by vocabulary rows like ``VocabParallelEmbedding`` (so tied
    weights shard alike); logits are gathered and the vocabulary padding cut off."""

    def __init__(
        self,
        embedding_dim: int,
        num_embeddings: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        tp_group: TPGroup,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_group = tp_group
        self.shard = VocabShard(num_embeddings, tp_group)
        self.weight = loadable_param((self.shard.rows, embedding_dim), dtype, device, self.shard.load)
        self.bias = loadable_param((self.shard.rows,), dtype, device, self.shard.load) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp_group.all_gather(self.gemm(hidden, self.bias))
        return logits[..., : self.num_embeddings]
