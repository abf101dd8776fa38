"""`--tp 2` on CPU (gloo): the same greedy output as transformers, about half the weights per rank.

MoE models too: experts split on their intermediate dimension (``--tp 2``) or whole experts
split over the ranks (``--tp 2 --ep-size 2``), with the router and shared experts the model's own.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import srt
from srt.platform.distributed import init_tp_group
from test_parity import MAX_NEW, assert_greedy_equal, make_prompts
from tiny_models import build_tiny_model, load_reference, reference_greedy

CASES = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": {},
    "phi3": {},  # fused qkv / gate_up: its plan gathers them and splits the input of o_proj / down_proj
    "llama-kv1": {"num_key_value_heads": 1},  # one KV head shared by both ranks
    "qwen3_moe": {},  # attention split, every expert's intermediate dimension split
    "deepseek_v3": {},  # routed experts split by srt, shared experts by the model's plan: each reduced once
    "granite_swa": {"sliding_window": 6},  # attention sinks split with the heads
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_matches_transformers(case, tmp_path):
    model_type = case.split("-")[0]
    model_dir = build_tiny_model(model_type, str(tmp_path), **CASES[case])
    prompts = make_prompts()
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=1024, tp_size=2) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        again = engine.generate(input_ids=prompts, sampling_params=params)  # served from the radix cache
        infos = engine.runtime.scheduler_infos
    reference = load_reference(model_dir)
    for prompt, out in zip(prompts, outs):
        assert_greedy_equal(reference, prompt, out["output_ids"], reference_greedy(reference, prompt, MAX_NEW))
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    assert infos["scheduler-TP0"].weight_bytes == infos["scheduler-TP1"].weight_bytes


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_tp2_ep2_matches_transformers(model_type, tmp_path):
    model_dir = build_tiny_model(model_type, str(tmp_path))
    prompts = make_prompts()
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=1024, tp_size=2, ep_size=2) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
    reference = load_reference(model_dir)
    for prompt, out in zip(prompts, outs):
        assert_greedy_equal(reference, prompt, out["output_ids"], reference_greedy(reference, prompt, MAX_NEW))


def test_tp2_halves_weight_memory_and_keeps_seeded_samples(tmp_path):
    """One model at TP 1 and 2: each rank holds half the weights (only norms are replicated), and
    a seeded request samples the same tokens."""
    model_dir = build_tiny_model("llama", str(tmp_path), hidden_size=256, intermediate_size=1024, num_attention_heads=8)
    params = {"temperature": 1.0, "seed": 3, "max_new_tokens": 12, "ignore_eos": True}
    sizes, outs = {}, {}
    for tp in (1, 2):
        with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=256, tp_size=tp) as engine:
            sizes[tp] = engine.runtime.info.weight_bytes
            outs[tp] = engine.generate(input_ids=[5, 6, 7], sampling_params=params)["output_ids"]
            unseeded = engine.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 1.0, "max_new_tokens": 12})
            assert unseeded["meta_info"]["finish_reason"] is not None  # ranks agreed, nothing hung
    assert 0.45 < sizes[2] / sizes[1] < 0.55, sizes
    assert outs[1] == outs[2]


def test_dp2_spreads_requests_over_both_replicas(tmp_path):
    model_dir = build_tiny_model("llama", str(tmp_path))
    prompts = make_prompts()
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    for method in ("round_robin", "shortest_queue"):
        with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=512, dp_size=2, load_balance_method=method) as engine:
            outs = engine.generate(input_ids=prompts * 2, sampling_params=params)
            replicas = engine._call(engine.tokenizer_manager.get_replica_states())
        reference = load_reference(model_dir)
        for prompt, out in zip(prompts * 2, outs):
            assert_greedy_equal(reference, prompt, out["output_ids"], reference_greedy(reference, prompt, MAX_NEW))
        assert len(replicas) == 2 and all(r.cached_tokens > 0 for r in replicas), replicas


def test_two_nodes_on_localhost_serve_a_request(tmp_path):
    import subprocess
    import sys

    import httpx

    from server_process import free_port, running_server, stop

    model_dir = build_tiny_model("llama", str(tmp_path))
    common = ["--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}", "--max-total-tokens", "512"]
    follower_port = free_port()
    follower = subprocess.Popen(
        [sys.executable, "-m", "srt.launch", "--model-path", model_dir, "--node-rank", "1", "--port", str(follower_port), *common],
        start_new_session=True,
    )
    try:
        with running_server(model_dir, "--node-rank", "0", *common) as (base_url, _):
            body = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
            out = httpx.post(f"{base_url}/generate", json=body, timeout=60).json()
            assert len(out["output_ids"]) == 6
            assert httpx.get(f"http://127.0.0.1:{follower_port}/health", timeout=5).status_code == 200
        assert follower.wait(timeout=30) != 0  # its peer went away: the follower exits instead of hanging
    finally:
        stop(follower)


def test_http_server_with_tp2_streams_a_chat(tmp_path):
    import openai

    from server_process import running_server
    from test_openai_api import CHAT_TEMPLATE

    model_dir = build_tiny_model("llama", str(tmp_path / "llama"))
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    with running_server(model_dir, "--tp", "2", "--max-total-tokens", "512", "--chat-template", str(template)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        request = {"model": model_dir, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        whole = client.chat.completions.create(**request).choices[0].message.content
        chunks = client.chat.completions.create(**request, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole


def test_killing_one_rank_makes_the_server_exit_with_an_error(tmp_path):
    import os
    import signal

    import psutil

    from server_process import running_server

    model_dir = build_tiny_model("llama", str(tmp_path))
    with running_server(model_dir, "--tp", "2", "--max-total-tokens", "256") as (_, proc):
        spawned = sorted(
            (c for c in psutil.Process(proc.pid).children() if c.cmdline()[-1] in ("srt.scheduler", "srt.detokenizer")),
            key=lambda c: c.pid,
        )
        assert len(spawned) == 3  # scheduler ranks 0 and 1, then the detokenizer, in start order
        os.kill(spawned[1].pid, signal.SIGKILL)
        assert proc.wait(timeout=60) != 0


def test_a_single_rank_group_is_the_identity_without_torch_distributed():
    group = init_tp_group(0, 1, torch.device("cpu"), init_method="unused://")
    x = torch.arange(6.0).reshape(2, 3)
    assert (group.rank, group.size) == (0, 1)
    assert group.all_reduce(x) is x and group.all_gather(x) is x
    assert not dist.is_initialized()
