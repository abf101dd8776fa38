"""Each model gets its own attention function and forward state.

An ``AttentionContext`` registers the srt attention under a name of its own; the model
whose config names it reaches that context's backend and batch and no other's. Entering
a forward is nesting-safe: leaving it restores the batch (and backend) that was there.
Two ModelRunners in one process (a target and a draft model, later) therefore each
write their own KV cache and produce their own model's logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from srt.layers.attention.interface import AttentionContext
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner
from srt.platform.distributed import TPGroup
from srt.server_args import ServerArgs
from tiny_models import build_tiny_model, load_reference


class RecordingBackend:
    """Answers every query with a constant of its own and records which batches it saw."""

    def __init__(self, fill: float) -> None:
        self.fill = fill
        self.prepared: list[object] = []
        self.stored: list[object] = []

    def prepare(self, batch) -> None:
        self.prepared.append(batch)

    def store(self, batch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.stored.append(batch)

    def forward(self, q: torch.Tensor, layer: int, batch, *_) -> torch.Tensor:
        return torch.full_like(q, self.fill)


class Layer(torch.nn.Module):
    layer_idx = 0
    scaling = 1.0


def attend(context: AttentionContext) -> torch.Tensor:
    """Call attention the way a transformers model does: by the name in its config."""
    q = torch.zeros(1, 2, 3, 4)
    out, _ = AttentionInterface()[context.name](Layer(), q, q, q, None)
    return out


def test_contexts_register_under_their_own_names_and_route_to_their_own_backends():
    a, b = AttentionContext(RecordingBackend(1.0)), AttentionContext(RecordingBackend(2.0))
    assert a.name != b.name
    with a.running("batch a"), b.running("batch b"):
        assert attend(a).unique().tolist() == [1.0]
        assert attend(b).unique().tolist() == [2.0]
    assert a.backend.stored == ["batch a"] and b.backend.stored == ["batch b"]


def test_nested_forwards_restore_the_outer_batch_and_backend():
    outer_backend, probe = RecordingBackend(1.0), RecordingBackend(3.0)
    context = AttentionContext(outer_backend)
    with context.running("outer"):
        with context.running("inner", backend=probe):
            assert (context.batch, context.backend) == ("inner", probe)
            assert attend(context).unique().tolist() == [3.0]
        assert (context.batch, context.backend) == ("outer", outer_backend)
        assert attend(context).unique().tolist() == [1.0]
    assert (context.batch, context.backend) == (None, outer_backend)
    assert probe.prepared == ["inner"] and outer_backend.prepared == ["outer"]


def test_attention_outside_a_forward_is_refused():
    with pytest.raises(RuntimeError, match="outside a forward context"):
        attend(AttentionContext(RecordingBackend(0.0)))


# ---- two models in one process ------------------------------------------------------


def extend_batch(runner: ModelRunner, row: int, tokens: list[int], start: int) -> ForwardBatch:
    """``tokens`` at positions ``start...`` of request ``row``, whose first ``start`` are cached."""
    n = len(tokens)
    table = runner.req_to_token_pool.req_to_token
    table[row, start : start + n] = runner.allocator.alloc(n)
    positions = torch.arange(start, start + n)
    return ForwardBatch(
        input_ids=torch.tensor(tokens),
        positions=positions,
        out_cache_loc=table[row, positions],
        req_pool_indices=torch.tensor([row]),
        seq_lens=torch.tensor([start + n]),
        prefix_lens=[start],
        extend_lens=[n],
        req_to_token=table,
        kv_cache=runner.kv_cache,
    )


def test_two_model_runners_in_one_process_keep_to_their_own_model(tmp_path):
    dirs = [build_tiny_model(kind, str(tmp_path / kind)) for kind in ("llama", "gemma2")]
    runners = [
        ModelRunner(ServerArgs(model_path=d, dtype="float32", device="cpu", max_total_tokens=64), d, TPGroup())
        for d in dirs
    ]
    assert runners[0].attention.name != runners[1].attention.name
    assert [r.model.config._attn_implementation for r in runners] == [r.attention.name for r in runners]
    prompt, next_token = [5, 77, 200, 31, 9], 140
    rows = [r.req_to_token_pool.alloc() for r in runners]
    # Prefill both, then decode one token on each: the decode reads the prompt's K/V back,
    # so each model must have written its own cache.
    prefill = [r.forward(extend_batch(r, row, prompt, 0)) for r, row in zip(runners, rows)]
    decode = [r.forward(extend_batch(r, row, [next_token], len(prompt))) for r, row in zip(runners, rows)]
    for d, first, second in zip(dirs, prefill, decode):
        with torch.inference_mode():
            want = load_reference(d)(torch.tensor([prompt + [next_token]])).logits[0].float()
        torch.testing.assert_close(first[0], want[len(prompt) - 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(second[0], want[-1], atol=1e-4, rtol=1e-4)
