"""KV memory: request slots, KV slot allocation and the per-layer K/V buffers.

Three pieces, as in SGLang:
- ``ReqToTokenPool`` maps (request slot, position) to a KV slot; the attention backend
  reads a request's whole prefix through it.
- ``KVSlotAllocator`` hands out and takes back KV slots (one slot holds one token's
  K and V for every layer). Slot 0 is never handed out: padded gathers point at it.
- ``KVCache`` holds the K/V tensors, one ``[slots, kv_heads, head_dim]`` pair per layer.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """A ``[max_requests, max_context_len]`` table of KV slots, one row per live request."""

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self._free_slots = list(range(size))

    def available_size(self) -> int:
        return len(self._free_slots)

    def alloc(self) -> int | None:
        return self._free_slots.pop() if self._free_slots else None

    def free(self, slot: int) -> None:
        self._free_slots.append(slot)

    def clear(self) -> None:
        self._free_slots = list(range(self.size))


class KVSlotAllocator:
    """Free list of KV slots ``1..size``; slot 0 is reserved as the padding target."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.device = device
        self.clear()

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` free slots as an int64 tensor, or None when fewer than ``n`` are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        taken.reverse()
        return torch.tensor(taken, dtype=torch.int64, device=self.device)

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free.extend(reversed(slots.tolist()))

    def clear(self) -> None:
        # The free list is a stack whose top (its end) holds the lowest slots, and ``alloc``
        # hands out a run in ascending order: a prompt's K/V lie in memory in position order,
        # which attention reads fastest.
        self._free = list(range(self.size, 0, -1))


class KVCache:
    """Per-layer K and V buffers, indexed by KV slot."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.size = size
        self.dtype = dtype
        shape = (size + 1, num_kv_heads, head_dim)
        v_shape = (size + 1, num_kv_heads, v_head_dim)
        # Zeroed, so every page is committed now: the process's memory is its whole
        # reservation from the start, instead of creeping up for hours as the radix cache
        # keeps finished requests' K/V in slots never touched before (which looked like a
        # leak), and a host that cannot hold the cache fails at start-up, not under load.
        # Zeros also make the padding slot 0 safe: padded gathers read it under a mask,
        # and 0 x NaN from uninitialised memory would not vanish.
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` of shape ``[tokens, kv_heads, head_dim]`` at ``slots``."""
        self.k_buffers[layer][slots] = k.to(self.dtype)
        self.v_buffers[layer][slots] = v.to(self.dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * num_kv_heads * (head_dim + v_head_dim) * torch.empty((), dtype=dtype).element_size()
