"""What each rank reads from a checkpoint tensor: its shard, for a tensor in memory and a
safetensors slice alike (where only the shard is read from disk).

With ``packed=2`` the dimension holds two blocks side by side (a fused gate_up
projection): a rank's shard is its part of the first block followed by its part of the
second.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from srt.layers.weight_shards import read_full, read_shard, shape_of

FULL = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)


def expected_shard(dim: int, packed: int, index: int, count: int) -> torch.Tensor:
    blocks = FULL.chunk(packed, dim=dim)
    return torch.cat([block.chunk(count, dim=dim)[index] for block in blocks], dim=dim)


@pytest.fixture(params=["tensor", "safetensors"])
def loaded(request, tmp_path):
    """FULL as the loaders get it: a tensor, or a lazy safetensors slice."""
    if request.param == "tensor":
        yield FULL
        return
    path = str(tmp_path / "w.safetensors")
    save_file({"w": FULL}, path)
    with safe_open(path, framework="pt", device="cpu") as f:
        yield f.get_slice("w")


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("packed", [1, 2])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_every_rank_reads_its_part_of_every_block(loaded, dim, packed, count):
    shards = [read_shard(loaded, dim, packed, index, count) for index in range(count)]
    for index, shard in enumerate(shards):
        assert torch.equal(shard, expected_shard(dim, packed, index, count))
    # Together the ranks hold every element exactly once.
    assert sorted(torch.cat([s.flatten() for s in shards]).tolist()) == FULL.flatten().tolist()


def test_packed_two_blocks_are_cut_separately(loaded):
    rows = read_shard(loaded, 0, 2, 1, 2)  # rank 1 of 2: rows 2-3 of block 0-3, rows 6-7 of block 4-7
    assert torch.equal(rows, FULL[[2, 3, 6, 7]])


@pytest.mark.parametrize("packed, count", [(1, 3), (2, 3), (3, 2)])
def test_a_dimension_that_does_not_split_evenly_is_refused(loaded, packed, count):
    with pytest.raises(ValueError, match="does not split"):
        read_shard(loaded, 0, packed, 0, count)


def test_shape_and_full_read(loaded):
    assert shape_of(loaded) == [8, 16]
    assert torch.equal(read_full(loaded), FULL)


def test_a_scalar_reads_whole(tmp_path):
    """A 0-dim parameter (a learned activation coefficient, say) cannot be sliced: it is read whole."""
    path = str(tmp_path / "s.safetensors")
    save_file({"s": torch.tensor(3.5)}, path)
    with safe_open(path, framework="pt", device="cpu") as f:
        scalar = f.get_slice("s")
        assert shape_of(scalar) == []
        assert torch.equal(read_full(scalar), torch.tensor(3.5))
