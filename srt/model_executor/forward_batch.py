"""ForwardBatch: everything one model forward needs, built once per step by the scheduler.

The batch is one packed ragged sequence: request ``i`` contributes ``extend_lens[i]``
new tokens (a whole or chunked prompt, or one decode token) whose K/V go to
``out_cache_loc``, and attends over its ``prefix_lens[i]`` cached tokens plus those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from srt.mem_cache.memory_pool import KVCache


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions in each request
    out_cache_loc: torch.Tensor  # [T] KV slots of the new tokens
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B] prefix + new tokens
    prefix_lens: list[int]  # [B] tokens already in the KV cache
    extend_lens: list[int]  # [B] new tokens this forward
    req_to_token: torch.Tensor  # [max_requests, max_context_len]
    kv_cache: KVCache
    # Rows of the packed sequence whose logits the forward returns; None: each request's last new token.
    logits_indices: torch.Tensor | None = None
    # Each request's LoRA adapter (None: the base model); None when no request has one.
    lora_adapters: list[str | None] | None = None
    # Image features ``[n, hidden]`` that replace the token embeddings of packed rows ``image_rows``.
    image_rows: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    # Multimodal rotary positions ``[3, T]`` (Qwen2-VL's M-RoPE); None: ``positions`` on every axis.
    mrope_positions: torch.Tensor | None = None
    attn_metadata: Any = field(default=None)  # prepared by the attention backend, shared by all layers

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.extend_lens)

    @property
    def logit_rows(self) -> torch.Tensor:
        """The rows whose logits the forward returns (by default each request's last new token, where
        its next token comes from)."""
        if self.logits_indices is not None:
            return self.logits_indices
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.input_ids.device)
