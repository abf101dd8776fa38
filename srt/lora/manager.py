"""LoRAManager: one rank's adapters, their slots in the adapted layers, and each forward's batch.

Adapters are read from their folders (``--lora-paths`` at start-up, ``load`` later) and
kept whole in host memory, at most ``--max-loaded-loras`` of them. A forward runs
requests of up to ``--max-loras-per-batch`` adapters: each adapter a request uses is
copied into one of that many slots of every layer it adapts, least recently used slots
reused first (the scheduler admits no more adapters than there are slots).

What layers get slots is fixed at start-up, so that memory is planned once:
``--lora-target-modules`` (module names such as ``q_proj``, or ``all``) else the
modules the start-up adapters adapt, with ``--max-lora-rank`` else their largest rank.
An adapter loaded later must fit in those.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from srt.lora.adapter import AdapterError, LoRAAdapter, parse_lora_paths, read_adapter
from srt.lora.batch import LoRABatch, LoRAState
from srt.lora.linear_lora import LinearLoRA
from srt.platform.device import lora_kernel
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, model: nn.Module, args: ServerArgs, device: torch.device, dtype: torch.dtype) -> None:
        self.num_slots = args.max_loras_per_batch
        self.max_loaded = args.max_loaded_loras
        self.device, self.dtype = device, dtype
        initial = [read_adapter(name, path) for name, path in parse_lora_paths(args.lora_paths).items()]
        targets = set(args.lora_target_modules or ()) or set().union(*(a.target_suffixes for a in initial))
        self.max_rank = args.max_lora_rank or max((a.rank for a in initial), default=0)
        if not targets or not self.max_rank:
            raise ValueError("--enable-lora without --lora-paths needs --lora-target-modules and --max-lora-rank")
        self.state = LoRAState(self.num_slots, device)
        self.kernel = kernel = lora_kernel(device)
        adaptable = {name: m for name, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
        self.layers: dict[str, LinearLoRA] = {}
        for name, layer in adaptable.items():
            if "all" in targets or name.rpartition(".")[2] in targets:
                layer.lora = self.layers[name] = LinearLoRA(layer, self.state, self.num_slots, self.max_rank, kernel)
        missing = sorted(targets - {"all"} - {name.rpartition(".")[2] for name in self.layers})
        if missing:
            raise ValueError(f"--lora-target-modules {missing}: {type(model).__name__} has no such parallel linear layer")
        self.shapes = {name: (layer.in_features, layer.out_features) for name, layer in adaptable.items()}
        self.adapters: dict[str, LoRAAdapter] = {}
        self.ids: dict[str, int] = {}  # each load's own id: its prefix-cache namespace
        self._next_id = 1
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapters in slots, least recently used first
        for adapter in initial:
            self._add(adapter)
        logger.info(
            "LoRA: %d layers adapted (%s), %d slots of rank %d, adapters %s",
            len(self.layers), ", ".join(sorted(targets)), self.num_slots, self.max_rank, list(self.adapters) or "none",
        )  # fmt: skip

    # ---- adapters ----------------------------------------------------------------------------

    def load(self, name: str, path: str) -> None:
        """Read the adapter at ``path`` as ``name``; AdapterError says why it cannot be served."""
        if name in self.adapters:
            raise AdapterError(f"a LoRA adapter named {name!r} is already loaded")
        if self.max_loaded is not None and len(self.adapters) >= self.max_loaded:
            raise AdapterError(f"{len(self.adapters)} LoRA adapters are loaded (--max-loaded-loras {self.max_loaded}): unload one first")
        self._add(read_adapter(name, path))

    def unload(self, name: str) -> int:
        """Forget adapter ``name`` (no request may use it any more); returns its cache namespace."""
        del self.adapters[name]
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.clear(slot)
        return self.ids.pop(name)

    def _add(self, adapter: LoRAAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise AdapterError(f"LoRA adapter {adapter.name!r} has rank {adapter.rank}, more than --max-lora-rank {self.max_rank}")
        for module, (a, b) in adapter.weights.items():
            if module not in self.layers:
                reason = "has no slots (not in --lora-target-modules)" if module in self.shapes else "is not a parallel linear layer srt adapts"
                raise AdapterError(f"LoRA adapter {adapter.name!r} adapts {module}, which {reason}")
            in_features, out_features = self.shapes[module]
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise AdapterError(
                    f"LoRA adapter {adapter.name!r}: {module} is {in_features} -> {out_features}, but the adapter's "
                    f"lora_A / lora_B are {list(a.shape)} / {list(b.shape)} (an adapter of another base model?)"
                )
        self.adapters[adapter.name] = adapter
        self.ids[adapter.name] = self._next_id
        self._next_id += 1

    # ---- one forward -------------------------------------------------------------------------

    @contextmanager
    def running(self, adapters: list[str | None], extend_lens: list[int]) -> Iterator[None]:
        """During a forward: the batch's adapters in slots, the layers told which tokens use which
        (request ``i`` adds ``extend_lens[i]`` tokens under ``adapters[i]``, None for the base model)."""
        self._prepare(adapters, extend_lens)
        try:
            yield
        finally:
            self.state.batch = None

    def _prepare(self, adapters: list[str | None], extend_lens: list[int]) -> None:
        used = {name for name in adapters if name is not None}
        if not used:
            return
        if len(used) > self.num_slots:
            raise RuntimeError(f"a batch of {len(used)} LoRA adapters, more than the {self.num_slots} slots")
        for name in used:
            if name not in self.slot_of:
                self._swap_in(name, used)
            self.slot_of.move_to_end(name)
        slots = [-1 if name is None else self.slot_of[name] for name in adapters]
        batch = LoRABatch.of(slots, extend_lens, self.device)
        if self.kernel == "torch":
            batch.stack(self.max_rank, self.state.scales_tensor, self.dtype)
        self.state.batch = batch

    def _swap_in(self, name: str, used: set[str]) -> None:
        """Copy adapter ``name`` into a free slot, or the least recently used one this batch does not need."""
        taken = set(self.slot_of.values())
        free = [slot for slot in range(self.num_slots) if slot not in taken]
        if free:
            slot = free[0]
        else:
            victim = next(n for n in self.slot_of if n not in used)
            slot = self.slot_of.pop(victim)
        adapter = self.adapters[name]
        for module, layer in self.layers.items():
            if module in adapter.weights:
                layer.load(slot, *adapter.weights[module])
            elif layer.occupied[slot]:
                layer.clear(slot)
        self.state.set_scale(slot, adapter.scaling)
        self.slot_of[name] = slot
