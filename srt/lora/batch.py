"""LoRABatch: which adapter slot each token of one forward uses, in the forms the kernels read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from srt.kernels.torch_lora import TokenRows

# Up to this many tokens a forward runs the stacked form on CPU (srt.kernels.torch_lora): its
# extra FLOPs (every token through every active slot) cost less than a GEMM pair per adapter.
_STACKED_MAX_TOKENS = 256


@dataclass
class LoRABatch:
    # Runs of consecutive tokens with one slot (-1: the base model alone), for the Triton kernel.
    seg_indptr: torch.Tensor  # [segments + 1] int32
    seg_slots: torch.Tensor  # [segments] int32
    max_seg_len: int
    # The torch forms: the tokens of each slot the batch uses (one GEMM pair each), or for a
    # small batch each token's scale over the columns of its slot among the first ``active_slots``.
    groups: list[tuple[int, TokenRows]]
    active_slots: int = 0
    token_scales: torch.Tensor | None = None  # [tokens, active_slots * rank]

    @classmethod
    def of(cls, slots: list[int], extend_lens: list[int], device: torch.device) -> LoRABatch:
        """The batch whose request ``i`` adds ``extend_lens[i]`` consecutive tokens under slot ``slots[i]``."""
        bounds, seg_slots = [0], []
        for slot, n in zip(slots, extend_lens):
            if seg_slots and seg_slots[-1] == slot:
                bounds[-1] += n  # the same adapter as the request before: one segment
            else:
                seg_slots.append(slot)
                bounds.append(bounds[-1] + n)
        ranges: dict[int, list[tuple[int, int]]] = {}
        for g, slot in enumerate(seg_slots):
            if slot >= 0:
                ranges.setdefault(slot, []).append((bounds[g], bounds[g + 1]))
        groups: list[tuple[int, TokenRows]] = []
        for slot, spans in ranges.items():
            if len(spans) == 1:
                groups.append((slot, slice(*spans[0])))
            else:
                rows = torch.cat([torch.arange(start, end) for start, end in spans]).to(device)
                groups.append((slot, rows))
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        return cls(
            seg_indptr=torch.tensor(bounds, dtype=torch.int32, device=device),
            seg_slots=torch.tensor(seg_slots, dtype=torch.int32, device=device),
            max_seg_len=max(lengths, default=0),
            groups=groups,
        )

    def stack(self, rank: int, scales: torch.Tensor, dtype: torch.dtype) -> None:
        """Add the stacked form's ``token_scales`` if the batch is small enough for it (``scales``:
        each slot's, float32)."""
        tokens = int(self.seg_indptr[-1])
        if tokens > _STACKED_MAX_TOKENS:
            return
        self.active_slots = max(slot for slot, _ in self.groups) + 1
        lengths = (self.seg_indptr[1:] - self.seg_indptr[:-1]).long()
        token_slot = torch.repeat_interleave(self.seg_slots.long(), lengths)  # -1: no adapter
        column_slot = torch.arange(self.active_slots * rank, device=token_slot.device) // rank
        scale = torch.where(token_slot >= 0, scales[token_slot.clamp(min=0)], 0.0)
        self.token_scales = ((token_slot[:, None] == column_slot[None, :]) * scale[:, None]).to(dtype)


class LoRAState:
    """What every adapted layer of one model reads during a forward: the current batch (None: no
    adapter in it, or no forward running) and each slot's scaling."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.batch: LoRABatch | None = None
        self.scales = [0.0] * num_slots
        self.scales_tensor = torch.zeros(num_slots, dtype=torch.float32, device=device)

    def set_scale(self, slot: int, scale: float) -> None:
        self.scales[slot] = scale
        self.scales_tensor[slot] = scale
