"""Multi-LoRA: srt with PEFT adapters generates what transformers + PEFT generates.

Three random adapters of one tiny Llama differ in rank, alpha scaling (one rsLoRA) and
target modules; their weights are drawn large so that each adapter changes the greedy
output. One batch mixes requests of all three and the base model, at TP 1 and 2.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import srt
from srt.kernels.torch_lora import add_lora_grouped, add_lora_stacked, lora_delta_reference
from srt.lora.adapter import AdapterError, read_adapter
from srt.lora.batch import LoRABatch
from srt.runtime.generate_request import InvalidRequestError
from test_parity import assert_greedy_equal
from tiny_models import VOCAB, build_tiny_model, load_reference, reference_greedy

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}

# name -> LoraConfig arguments
ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "mlp": dict(r=2, lora_alpha=6, target_modules=["gate_proj", "down_proj", "o_proj"]),
}


def save_adapter(model_dir: str, directory: str, seed: int, **config) -> str:
    """A PEFT adapter of the model in ``model_dir`` with random A and B (std 0.2, so it matters)."""
    model = get_peft_model(load_reference(model_dir), LoraConfig(init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(directory)
    return directory


def prompts(seed: int = 0) -> list[list[int]]:
    """Short prompts, and one longer than the batches that run LoRA in its stacked form on CPU
    (srt.lora.batch), so that the grouped form runs too."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (7, 19, 4, 300)]


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory) -> dict:
    """The model, its adapters, and transformers + PEFT's greedy output for each (None: the base model)."""
    root = tmp_path_factory.mktemp("lora")
    model_dir = build_tiny_model("llama", str(root / "model"))
    paths = {name: save_adapter(model_dir, str(root / name), seed, **cfg) for seed, (name, cfg) in enumerate(ADAPTERS.items())}
    expected = {}
    for name in [None, *paths]:
        reference = load_reference(model_dir)
        if name is not None:
            reference = PeftModel.from_pretrained(reference, paths[name]).eval()
        expected[name] = (reference, [reference_greedy(reference, p, MAX_NEW) for p in prompts()])
    return {"model_dir": model_dir, "paths": paths, "expected": expected}


def lora_paths(paths: dict[str, str]) -> list[str]:
    return [f"{name}={path}" for name, path in paths.items()]


def assert_mixed_batch_matches(engine: srt.Engine, expected: dict) -> None:
    names = [None, "attn", "all", "mlp"]
    batch = [(name, p) for p in range(len(prompts())) for name in names]  # adapters interleaved in the batch
    outs = engine.generate(
        input_ids=[prompts()[p] for _, p in batch], sampling_params=GREEDY, lora_path=[name for name, _ in batch]
    )
    for (name, p), out in zip(batch, outs):
        reference, want = expected[name]
        assert_greedy_equal(reference, prompts()[p], out["output_ids"], want[p])


def test_adapters_change_the_output(lora_model) -> None:
    """Else the parity tests below could not tell an adapter from the base model."""
    expected = lora_model["expected"]
    outputs = {name: tuple(map(tuple, want)) for name, (_, want) in expected.items()}
    assert len(set(outputs.values())) == len(outputs)


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_batch_matches_peft(lora_model, tp: int) -> None:
    paths = lora_model["paths"]
    with srt.Engine(
        model_path=lora_model["model_dir"], dtype="float32", max_total_tokens=1024, tp_size=tp,
        lora_paths=lora_paths(paths), max_prefill_tokens=24,  # prompts join over several steps, decoding with others
        schedule_policy="lpm",  # matches prefixes in each adapter's own tree
    ) as engine:  # fmt: skip
        assert_mixed_batch_matches(engine, lora_model["expected"])
        if tp == 1:
            assert_caches_are_per_adapter(engine)


def assert_caches_are_per_adapter(engine: srt.Engine) -> None:
    """A prompt computed under one adapter is a cache hit for that adapter only."""
    prompt = prompts(seed=5)[1]
    one = {"temperature": 0, "max_new_tokens": 1}

    def cached(name: str | None) -> int:
        return engine.generate(input_ids=prompt, sampling_params=one, lora_path=name)["meta_info"]["cached_tokens"]

    assert cached("attn") == 0
    assert cached("attn") == len(prompt) - 1
    assert cached("mlp") == 0
    assert cached(None) == 0
    assert cached("mlp") == len(prompt) - 1


def test_fewer_slots_than_adapters_in_flight(lora_model) -> None:
    """With one slot, requests of three adapters take turns (each batch holds one adapter) and
    every one still gets its own adapter's output."""
    with srt.Engine(
        model_path=lora_model["model_dir"], dtype="float32", max_total_tokens=1024,
        lora_paths=lora_paths(lora_model["paths"]), max_loras_per_batch=1, schedule_policy="dfs-weight",
    ) as engine:  # fmt: skip
        assert_mixed_batch_matches(engine, lora_model["expected"])


def test_load_and_unload_while_serving(lora_model, tmp_path) -> None:
    paths, expected = lora_model["paths"], lora_model["expected"]
    refused = save_adapter(lora_model["model_dir"], str(tmp_path / "saves"), 9, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    too_big = save_adapter(lora_model["model_dir"], str(tmp_path / "big"), 9, r=16, target_modules=["q_proj"])
    with srt.Engine(
        model_path=lora_model["model_dir"], dtype="float32", max_total_tokens=1024, enable_lora=True,
        lora_target_modules=["all"], max_lora_rank=8, max_loaded_loras=2,
    ) as engine:  # fmt: skip
        with pytest.raises(InvalidRequestError, match="not loaded"):
            engine.generate(input_ids=prompts()[0], sampling_params=GREEDY, lora_path="attn")
        engine.load_lora_adapter("attn", paths["attn"])
        engine.load_lora_adapter("all", paths["all"])
        for name, path, match in [
            ("x", paths["mlp"], "max-loaded-loras 2"),
            ("attn", paths["mlp"], "already loaded"),
        ]:
            with pytest.raises(InvalidRequestError, match=match):
                engine.load_lora_adapter(name, path)
        out = engine.generate(input_ids=prompts(), sampling_params=GREEDY, lora_path="attn")
        assert [o["output_ids"] for o in out] == expected["attn"][1]
        stream = engine.generate(input_ids=prompts()[1], sampling_params={**GREEDY, "max_new_tokens": 200}, lora_path="all", stream=True)
        next(stream)  # running now
        with pytest.raises(InvalidRequestError, match="in use"):
            engine.unload_lora_adapter("all")
        stream.close()
        engine.unload_lora_adapter("attn")
        with pytest.raises(InvalidRequestError, match="not loaded"):
            engine.generate(input_ids=prompts()[0], sampling_params=GREEDY, lora_path="attn")
        for name, path, match in [("saves", refused, "modules_to_save"), ("big", too_big, "rank 16, more than --max-lora-rank 8")]:
            with pytest.raises(InvalidRequestError, match=match):
                engine.load_lora_adapter(name, path)
        engine.load_lora_adapter("mlp", paths["mlp"])  # reuses attn's place, and its slot
        out = engine.generate(input_ids=prompts()[:3], sampling_params=GREEDY, lora_path=["mlp", None, "all"])
        assert [o["output_ids"] for o in out] == [expected["mlp"][1][0], expected[None][1][1], expected["all"][1][2]]


def test_adapter_folders_srt_cannot_serve_are_refused(lora_model, tmp_path) -> None:
    source = lora_model["paths"]["attn"]
    with open(os.path.join(source, "adapter_config.json")) as f:
        config = json.load(f)
    for field, value, match in [
        ("use_dora", True, "DoRA"),
        ("alpha_pattern", {"q_proj": 3}, "alpha_pattern"),
        ("bias", "all", "trained biases"),
        ("peft_type", "IA3", "not LoRA"),
    ]:
        folder = tmp_path / field
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        os.symlink(os.path.join(source, "adapter_model.safetensors"), folder / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match=match):
            read_adapter(field, str(folder))
    with pytest.raises(AdapterError, match="not found"):
        read_adapter("missing", str(tmp_path / "nowhere"))


def test_lora_batch_forms_compute_what_the_reference_computes() -> None:
    """Requests of one adapter become one group however the batch interleaves them; the grouped and
    stacked torch forms add what the per-segment reference adds (slot -1 tokens get nothing)."""
    batch = LoRABatch.of([0, 0, -1, 1, 0], [3, 1, 2, 4, 2], torch.device("cpu"))
    assert batch.seg_indptr.tolist() == [0, 4, 6, 10, 12]
    assert batch.seg_slots.tolist() == [0, -1, 1, 0]
    assert batch.max_seg_len == 4
    groups = dict(batch.groups)
    assert groups[1] == slice(6, 10)
    assert groups[0].tolist() == [0, 1, 2, 3, 10, 11]
    gen = torch.Generator().manual_seed(0)
    slots, rank = 3, 3  # slot 2 is loaded but not in the batch
    x, a, b = torch.randn(12, 6, generator=gen), torch.randn(slots, rank, 6, generator=gen), torch.randn(slots, 5, rank, generator=gen)
    scales = torch.tensor([0.5, 2.0, 7.0])
    y = torch.randn(12, 5, generator=gen)
    want = y + lora_delta_reference(x, a, b, scales, batch.seg_indptr, batch.seg_slots)
    a_stacked, b_stacked = a.reshape(slots * rank, 6), b.permute(1, 0, 2).reshape(5, slots * rank)  # torch's layout
    grouped = y.clone()
    add_lora_grouped(grouped, x, a_stacked, b_stacked, rank, scales.tolist(), batch.groups)
    torch.testing.assert_close(grouped, want)
    batch.stack(rank, scales, torch.float32)
    assert batch.active_slots == 2 and batch.token_scales.shape == (12, 2 * rank)
    stacked = y.clone()
    add_lora_stacked(stacked, x, a_stacked[: 2 * rank], b_stacked[:, : 2 * rank], batch.token_scales)
    torch.testing.assert_close(stacked, want)
    assert torch.equal(stacked[4:6], y[4:6])
