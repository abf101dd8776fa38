"""The runtime's processes: parity through them, prefix reuse, chunked prefill, retraction,
concurrency, streaming, stop strings, abort and crash handling, and no leaked memory."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

import srt
from srt.runtime.generate_request import GenerateReqInput
from srt.tokenizer_manager.manager import RuntimeDiedError
from test_parity import MAX_NEW, assert_greedy_equal, make_prompts
from tiny_models import VOCAB, build_tiny_model, load_reference, reference_greedy

GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def engine(llama_dir):
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=4096) as engine:
        yield engine


@pytest.fixture(scope="module")
def expected(llama_dir) -> list[list[int]]:
    reference = load_reference(llama_dir)
    return [reference_greedy(reference, p, MAX_NEW) for p in make_prompts()]


def assert_idle(engine: srt.Engine) -> None:
    """Nothing running, and every KV slot either free or held (evictably) by the prefix cache."""
    state = engine.get_internal_state()
    assert state.running_requests == 0 and state.waiting_requests == 0
    assert state.free_request_slots == state.total_request_slots
    assert state.free_kv_slots + state.cached_tokens == state.total_kv_slots
    assert state.evictable_tokens == state.cached_tokens


def test_second_run_is_served_from_the_prefix_cache(engine, expected):
    prompts = make_prompts()
    first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    second = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in second] == expected
    assert all(o["meta_info"]["cached_tokens"] == len(p) - 1 for o, p in zip(second, prompts))
    assert_idle(engine)
    assert engine.flush_cache()
    state = engine.get_internal_state()
    assert state.cached_tokens == 0 and state.free_kv_slots == state.total_kv_slots


@pytest.mark.parametrize(
    "options",
    [
        {"disable_radix_cache": True},
        {"chunked_prefill_size": 8},
        {"chunked_prefill_size": 8, "schedule_policy": "lpm"},
        {"schedule_policy": "dfs-weight", "max_prefill_tokens": 16},
        {"enable_torch_compile": True},
        {"enable_mixed_chunk": True, "chunked_prefill_size": 8},
    ],
    ids=["radix-off", "chunked", "chunked-lpm", "dfs-weight", "torch-compile", "mixed-chunk"],
)
def test_parity_under_scheduling_options(llama_dir, expected, options):
    prompts = make_prompts()
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=1024, **options) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert_idle(engine)
    reference = load_reference(llama_dir)
    for prompt, out, want in zip(prompts, outs, expected):
        assert_greedy_equal(reference, prompt, out["output_ids"], want)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]
    cached = [o["meta_info"]["cached_tokens"] for o in again]
    assert (sum(cached) == 0) if options.get("disable_radix_cache") else all(c > 0 for c in cached)


@pytest.mark.parametrize("mixed_chunk", [False, True], ids=["prefill-or-decode", "mixed-chunk"])
def test_retraction_keeps_outputs_exact(llama_dir, mixed_chunk):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(8, 24))] for _ in range(12)]
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=4096) as roomy:
        want = [o["output_ids"] for o in roomy.generate(input_ids=prompts, sampling_params=params)]
    # 12 requests need up to ~12 * 63 slots; 200 forces the scheduler to retract while decoding.
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=200, enable_mixed_chunk=mixed_chunk) as tight:
        got = [o["output_ids"] for o in tight.generate(input_ids=prompts, sampling_params=params)]
        state = tight.get_internal_state()
        assert_idle(tight)
    assert got == want
    assert state.num_retractions > 0


def test_seeded_sampling_survives_retraction(llama_dir):
    prompts = [[5 + i, 9, 13, 40 + i, 7] for i in range(10)]
    params = [{"temperature": 0.9, "top_p": 0.95, "seed": 100 + i, "max_new_tokens": 30, "ignore_eos": True} for i in range(10)]
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=4096) as roomy:
        want = [o["output_ids"] for o in roomy.generate(input_ids=prompts, sampling_params=params)]
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=120) as tight:
        got = [o["output_ids"] for o in tight.generate(input_ids=prompts, sampling_params=params)]
        assert tight.get_internal_state().num_retractions > 0
    assert got == want


def test_hundred_concurrent_requests_equal_sequential(engine):
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))] for _ in range(100)]
    params = [{"temperature": 0, "max_new_tokens": rng.randrange(1, 12), "ignore_eos": True} for _ in prompts]
    sequential = [engine.generate(input_ids=p, sampling_params=sp)["output_ids"] for p, sp in zip(prompts, params)]
    engine.flush_cache()

    async def all_at_once():
        return await asyncio.gather(*(engine.async_generate(input_ids=p, sampling_params=sp) for p, sp in zip(prompts, params)))

    concurrent = [o["output_ids"] for o in asyncio.run(all_at_once())]
    assert concurrent == sequential
    assert_idle(engine)


def test_streaming_equals_non_streaming(engine):
    prompt = make_prompts()[2]
    full = engine.generate(input_ids=prompt, sampling_params=GREEDY)
    pieces = list(engine.generate(input_ids=prompt, sampling_params=GREEDY, stream=True))
    assert len(pieces) == MAX_NEW
    assert "".join(p["text"] for p in pieces) == full["text"]
    assert sum((p["output_ids"] for p in pieces), []) == full["output_ids"]
    assert pieces[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]


def test_a_request_that_does_not_stream_gets_everything_in_one_output(engine):
    """Non-streaming callers (``generate`` without ``stream``, non-streaming HTTP requests) get a
    single output at the end holding every token, its text and logprobs: the same as the steps."""
    prompt = make_prompts()[2]

    async def outputs(stream: bool) -> list:
        tm = engine.tokenizer_manager
        reqs = tm.check(GenerateReqInput(input_ids=prompt, sampling_params=GREEDY, return_logprob=True, top_logprobs_num=2, stream=stream))
        return [out async for _, out in tm.generate(reqs)]

    steps = asyncio.run_coroutine_threadsafe(outputs(True), engine._loop).result()
    (whole,) = asyncio.run_coroutine_threadsafe(outputs(False), engine._loop).result()
    assert len(steps) == MAX_NEW
    assert whole.new_token_ids == [t for out in steps for t in out.new_token_ids]
    assert whole.text == "".join(out.text for out in steps)
    assert whole.logprobs == pytest.approx([lp for out in steps for lp in out.logprobs])
    assert [[t for t, _ in top] for top in whole.top_logprobs] == [[t for t, _ in top] for out in steps for top in out.top_logprobs]
    assert whole.finish_reason == steps[-1].finish_reason and whole.completion_tokens == MAX_NEW


def test_stop_string_across_tokens_is_trimmed(engine):
    prompt = make_prompts()[2]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "logit_bias": {str(t): 8.0 for t in range(97, 123)}}
    text = engine.generate(input_ids=prompt, sampling_params=params)["text"]
    assert len(text) >= 10, text  # the bias keeps output to ASCII letters: one byte token per character
    stop = text[5:8]  # three tokens long
    params["stop"] = [stop]
    cut = engine.generate(input_ids=prompt, sampling_params=params)
    assert cut["text"] == text[: text.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = engine.generate(input_ids=prompt, sampling_params={**params, "no_stop_trim": True})
    assert kept["text"] == text[: text.index(stop) + len(stop)]
    streamed = "".join(p["text"] for p in engine.generate(input_ids=prompt, sampling_params=params, stream=True))
    assert streamed == cut["text"]


def test_abandoned_stream_is_aborted_and_freed(engine):
    stream = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 500, "ignore_eos": True}, stream=True)
    for _ in zip(range(3), stream):
        pass
    stream.close()
    for _ in range(50):
        state = engine.get_internal_state()
        if state.running_requests == 0:
            break
    assert_idle(engine)


def test_invalid_requests_are_refused_before_running(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(input_ids=[1, 2], sampling_params={"temperature": -1})
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        engine.generate(input_ids=[1, 2], sampling_params={"temprature": 1})
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 10**6})
    assert engine.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] <= 2


def test_a_dead_scheduler_fails_requests_instead_of_hanging(llama_dir):
    with srt.Engine(model_path=llama_dir, dtype="float32", max_total_tokens=256) as engine:
        scheduler = engine.runtime.processes["scheduler-TP0"]
        os.kill(scheduler.pid, signal.SIGKILL)
        scheduler.wait(5)
        with pytest.raises(RuntimeDiedError, match="scheduler-TP0"):
            engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})
    assert not engine.runtime.processes  # shutdown stopped and reaped the detokenizer too
