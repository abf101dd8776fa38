"""Tensor-parallel linears that replace a transformers model's projections.

Each parameter carries a ``weight_loader(param, loaded)`` that cuts this rank's shard
out of the checkpoint tensor (``srt.layers.weight_shards``), so loading needs no
per-model table. With one rank every layer is the plain linear it replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from srt.layers.cpu_weight_packing import PackableWeight
from srt.layers.weight_shards import loadable_param, read_full, read_shard
from srt.platform.distributed import TPGroup

if TYPE_CHECKING:
    from srt.lora.linear_lora import LinearLoRA


class ColumnParallelLinear(PackableWeight, nn.Module):
    """``y = x W^T + b`` with W split along its output rows; ``gather_output`` rebuilds the full ``y``.

    ``num_shards`` < tp size splits W into fewer shards, each held by ``tp size /
    num_shards`` consecutive ranks: how K/V projections with fewer KV heads than ranks
    are replicated (as in SGLang and vLLM).
    """

    lora: LinearLoRA | None = None  # adapter slots, with --enable-lora (srt.lora)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        tp_group: TPGroup,
        gather_output: bool = False,
        packed: int = 1,
        num_shards: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_group = tp_group
        self.gather_output, self.packed = gather_output, packed
        self.num_shards = num_shards or tp_group.size
        if tp_group.size % self.num_shards:
            raise ValueError(f"{self.num_shards} shards cannot be spread over tp_size={tp_group.size} ranks")
        self.shard_index = tp_group.rank // (tp_group.size // self.num_shards)
        if out_features % self.num_shards:
            raise ValueError(f"output features of size {out_features} do not split into {self.num_shards} shards")
        local_out = out_features // self.num_shards
        self.weight = loadable_param((local_out, in_features), dtype, device, self._load)
        self.bias = loadable_param((local_out,), dtype, device, self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: Any) -> None:
        param.data.copy_(read_shard(loaded, 0, self.packed, self.shard_index, self.num_shards))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemm(x, self.bias)
        if self.lora is not None:
            self.lora.add(y, x)
        return self.tp_group.all_gather(y) if self.gather_output else y


class RowParallelLinear(PackableWeight, nn.Module):
    """``y = x W^T + b`` with W split along its input columns and partial sums all-reduced.

    ``input_is_parallel=False`` when the model feeds the full input (plans that say
    ``rowwise_split_input``): the layer takes its own slice first.
    """

    lora: LinearLoRA | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        tp_group: TPGroup,
        input_is_parallel: bool = True,
        packed: int = 1,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_group = tp_group
        self.input_is_parallel, self.packed = input_is_parallel, packed
        if in_features % tp_group.size:
            raise ValueError(f"input features of size {in_features} is not divisible by tp_size={tp_group.size}")
        local_in = in_features // tp_group.size
        self.weight = loadable_param((out_features, local_in), dtype, device, self._load_weight)
        self.bias = loadable_param((out_features,), dtype, device, self._load_bias) if bias else None

    def _load_weight(self, param: nn.Parameter, loaded: Any) -> None:
        param.data.copy_(read_shard(loaded, 1, self.packed, self.tp_group.rank, self.tp_group.size))

    def _load_bias(self, param: nn.Parameter, loaded: Any) -> None:
        param.data.copy_(read_full(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_group.size > 1:
            x = x.chunk(self.tp_group.size, dim=-1)[self.tp_group.rank]
        y = self.gemm(x, None)
        if self.lora is not None:
            self.lora.add(y, x)  # a partial sum on each rank, like the GEMM's (srt.lora.linear_lora)
        y = self.tp_group.all_reduce(y)
        # The bias is added once, after the reduction, not once per rank.
        return y if self.bias is None else y + self.bias
