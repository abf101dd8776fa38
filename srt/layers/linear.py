"""Tensor-parallel layers that replace a transformers model's linears and embeddings.

Each parameter carries a ``weight_loader(param, loaded)`` that cuts this rank's shard
out of the checkpoint tensor, so loading needs no per-model table. ``loaded`` is a
``torch.Tensor`` or a safetensors slice (``safe_open(...).get_slice``): both index with
slices, and with a slice only the shard is read from disk. With one rank every layer
is the plain layer it replaced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srt.platform.distributed import tp_all_gather, tp_all_reduce, tp_rank, tp_size


def shape_of(loaded: Any) -> list[int]:
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


def read_shard(loaded: Any, dim: int, packed: int = 1, index: int | None = None, count: int | None = None) -> torch.Tensor:
    """Shard ``index`` of ``count`` (default: this rank of the TP group) of ``loaded`` along ``dim``.

    ``packed`` > 1 means the dimension holds that many equal blocks side by side (a
    fused gate_up projection, say): each block is split, and this rank gets its part
    of every block, in order.
    """
    index = tp_rank() if index is None else index
    count = tp_size() if count is None else count
    full = shape_of(loaded)
    block = full[dim] // packed
    if full[dim] % (packed * count) or block % count:
        raise ValueError(f"dimension {dim} of size {full[dim]} does not split into {packed} x {count} shards")
    shard = block // count
    pieces = []
    for b in range(packed):
        start = b * block + index * shard
        window = tuple(slice(start, start + shard) if d == dim else slice(None) for d in range(len(full)))
        pieces.append(torch.as_tensor(loaded[window]))
    return pieces[0] if packed == 1 else torch.cat(pieces, dim=dim)


def read_full(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _split(size: int, what: str) -> int:
    if size % tp_size():
        raise ValueError(f"{what} of size {size} is not divisible by tp_size={tp_size()}")
    return size // tp_size()


# Pre-blocked oneDNN weights by key. torch.compile cannot trace oneDNN's opaque weight
# tensors, so the GEMM on them is a custom op that receives the key instead.
_PACKED_WEIGHTS: list[torch.Tensor] = []


@torch.library.custom_op("srt::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, bias: torch.Tensor | None, key: int, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED_WEIGHTS[key], bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, bias: torch.Tensor | None, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackableWeight:
    """A layer whose GEMM can use oneDNN's pre-blocked weight layout on CPU (1.3-2.5x faster
    than ``F.linear`` measured here, fp32 and bf16). ``pack`` is called once after loading."""

    packed_key: int | None = None

    def pack(self, keep_plain: bool) -> None:
        self.packed_key = len(_PACKED_WEIGHTS)
        self.packed_out_features = self.weight.shape[0]
        _PACKED_WEIGHTS.append(torch.ops.mkldnn._reorder_linear_weight(self.weight.detach()))
        if not keep_plain:  # nothing else reads it: don't hold the weights twice
            self.weight.data = self.weight.data.new_empty(0)

    @property
    def packed_weight(self) -> torch.Tensor | None:
        return None if self.packed_key is None else _PACKED_WEIGHTS[self.packed_key]

    def gemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_key is not None:
            return packed_linear(x, bias, self.packed_key, self.packed_out_features)
        return F.linear(x, self.weight, bias)


def pack_linear_weights(model: nn.Module) -> None:
    """Pre-block every parallel linear's weight for oneDNN (CPU, fp32 / bf16). Weights shared
    with an embedding (tied LM heads) keep their plain copy for the embedding lookup."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, VocabParallelEmbedding)}
    for module in model.modules():
        if isinstance(module, PackableWeight):
            module.pack(keep_plain=id(module.weight) in shared)


def _new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader
    return param


class ColumnParallelLinear(PackableWeight, nn.Module):
    """``y = x W^T + b`` with W split along its output rows; ``gather_output`` rebuilds the full ``y``.

    ``num_shards`` < tp_size splits W into fewer shards, each held by ``tp_size /
    num_shards`` consecutive ranks: how K/V projections with fewer KV heads than ranks
    are replicated (as in SGLang and vLLM).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        gather_output: bool = False,
        packed: int = 1,
        num_shards: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.packed = gather_output, packed
        self.num_shards = num_shards or tp_size()
        if tp_size() % self.num_shards:
            raise ValueError(f"{self.num_shards} shards cannot be spread over tp_size={tp_size()} ranks")
        self.shard_index = tp_rank() // (tp_size() // self.num_shards)
        if out_features % self.num_shards:
            raise ValueError(f"output features of size {out_features} do not split into {self.num_shards} shards")
        local_out = out_features // self.num_shards
        self.weight = _new_param((local_out, in_features), dtype, device, self._load)
        self.bias = _new_param((local_out,), dtype, device, self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: Any) -> None:
        param.data.copy_(read_shard(loaded, 0, self.packed, self.shard_index, self.num_shards))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemm(x, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class RowParallelLinear(PackableWeight, nn.Module):
    """``y = x W^T + b`` with W split along its input columns and partial sums all-reduced.

    ``input_is_parallel=False`` when the model feeds the full input (plans that say
    ``rowwise_split_input``): the layer takes its own slice first.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        input_is_parallel: bool = True,
        packed: int = 1,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.packed = input_is_parallel, packed
        self.weight = _new_param((out_features, _split(in_features, "input features")), dtype, device, self._load_weight)
        self.bias = _new_param((out_features,), dtype, device, self._load_bias) if bias else None

    def _load_weight(self, param: nn.Parameter, loaded: Any) -> None:
        param.data.copy_(read_shard(loaded, 1, self.packed))

    def _load_bias(self, param: nn.Parameter, loaded: Any) -> None:
        param.data.copy_(read_full(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and tp_size() > 1:
            x = x.chunk(tp_size(), dim=-1)[tp_rank()]
        y = tp_all_reduce(self.gemm(x, None))
        # The bias is added once, after the reduction, not once per rank.
        return y if self.bias is None else y + self.bias


class VocabShard:
    """This rank's contiguous block of vocabulary rows (the vocabulary is padded to split evenly)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.rows

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
        embed_scale: torch.Tensor | float | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shard = VocabShard(num_embeddings)
        self.weight = _new_param((self.shard.rows, embedding_dim), dtype, device, self.shard.load)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.shard.start
            outside = (local < 0) | (local >= self.shard.rows)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = tp_all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))
        if self.embed_scale is not None:
            out = out * torch.as_tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out


class ParallelLMHead(PackableWeight, nn.Module):
    """The output projection split by vocabulary rows like ``VocabParallelEmbedding`` (so tied
    weights shard alike); logits are gathered and the vocabulary padding cut off."""

    def __init__(self, embedding_dim: int, num_embeddings: int, bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.shard = VocabShard(num_embeddings)
        self.weight = _new_param((self.shard.rows, embedding_dim), dtype, device, self.shard.load)
        self.bias = _new_param((self.shard.rows,), dtype, device, self.shard.load) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_all_gather(self.gemm(hidden, self.bias))
        return logits[..., : self.num_embeddings]
