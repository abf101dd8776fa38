"""What the batched sampler and SamplingParams promise.

Sampling is deterministic given (seed, output position), so every statistical check here
runs on fixed seeds and gives the same answer on every run.
"""

from __future__ import annotations

import math

import pytest
import torch

from srt.sampling.sampler import SamplingBatch, SamplingRequest, _filter, apply_logits_processors, sample, token_logprobs
from srt.sampling.sampling_params import SamplingParams

CPU = torch.device("cpu")


def req(seed: int = 0, prompt=(), output=(), stop_ids=(), **params) -> SamplingRequest:
    return SamplingRequest(SamplingParams(**params), list(prompt), list(output), seed, list(stop_ids))


def batch_of(reqs: list[SamplingRequest], vocab_size: int) -> SamplingBatch:
    return SamplingBatch.build(reqs, vocab_size, CPU)


def draw(logits: torch.Tensor, reqs: list[SamplingRequest]) -> list[int]:
    """One token per request; ``logits`` is one row shared by all requests, or one row each."""
    if logits.dim() == 1:
        logits = logits.expand(len(reqs), -1).clone()
    return sample(logits, batch_of(reqs, logits.shape[-1])).tolist()


def draws(logits: torch.Tensor, n: int = 2000, **params) -> list[int]:
    """``n`` independent draws from one row of logits: seeds 0..n-1, first output position."""
    return draw(logits, [req(seed=s, **params) for s in range(n)])


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- greedy ----------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_after_penalties():
    logits = torch.tensor([0.0, 1.0, 0.5, 3.0, 0.0, 2.5, 0.0, 0.0])
    # Token 3 leads the raw logits, but it was generated twice: 3 - 2 * 0.5 - 0.5 = 1.5 < 2.5.
    penalized = req(temperature=0, output=[3, 3], frequency_penalty=0.5, presence_penalty=0.5)
    assert draw(logits, [req(temperature=0)]) == [3]
    assert draw(logits, [penalized]) == [5]

    mixed = [
        req(temperature=0, prompt=[1, 2], output=[4, 4, 7], frequency_penalty=1.5, repetition_penalty=1.3),
        req(temperature=0, output=[0, 5], presence_penalty=2.0),
        req(temperature=0, logit_bias={6: 4.0}),
        req(temperature=0, prompt=list(range(8)), repetition_penalty=2.0),
    ]
    rows = random_logits(4, 8, seed=1)
    batch = batch_of(mixed, 8)
    assert sample(rows, batch).tolist() == apply_logits_processors(rows, batch).argmax(dim=-1).tolist()


def test_a_batch_mixes_greedy_and_sampled_rows():
    vocab = 16
    rows = random_logits(6, vocab, seed=2, scale=1.0)
    reqs = [
        req(temperature=0),
        req(seed=11, temperature=1.0),
        req(top_k=1, temperature=1.0),
        req(seed=12, temperature=2.0, top_p=0.9),
        req(temperature=0, output=[int(rows[4].argmax())], frequency_penalty=2.0),
        req(seed=13, temperature=0.5, min_p=0.1),
    ]
    out = draw(rows, reqs)
    batch = batch_of(reqs, vocab)
    greedy = apply_logits_processors(rows, batch).argmax(dim=-1).tolist()
    for i in (0, 2, 4):
        assert out[i] == greedy[i]
    assert out[4] != int(rows[4].argmax())  # the penalty moved it
    for i in (1, 3, 5):  # each sampled row draws what it draws alone
        assert out[i] == draw(rows[i], [reqs[i]])[0]


# ---- seeded randomness -----------------------------------------------------------------


def _neighbours(vocab: int) -> list[SamplingRequest]:
    """Four requests with every setting the batch can vary, to surround the one under test."""
    return [
        req(temperature=0),
        req(seed=99, temperature=0.3, top_p=0.5, top_k=3, min_p=0.2),
        req(seed=98, output=[1, 1, 2], prompt=[3], frequency_penalty=1.0, presence_penalty=-0.5, repetition_penalty=1.5),
        req(seed=97, output=[0], stop_ids=[4, 5], min_new_tokens=4, logit_bias={vocab - 1: 3.0}),
    ]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    vocab = 32
    logits = random_logits(1, vocab, seed=3, scale=1.0)[0]
    for seed in (0, 1, 12345, 2**31 - 1):
        for step in (0, 1, 7, 300):
            me = req(seed=seed, output=[0] * step, temperature=1.3)
            alone = draw(logits, [me])
            assert draw(logits, [me]) == alone
            for position in range(5):
                reqs = _neighbours(vocab)
                reqs.insert(position, me)
                assert draw(logits, reqs)[position] == alone[0], (seed, step, position)


def test_different_seeds_and_steps_give_different_draws():
    vocab = 16
    logits = torch.zeros(vocab)

    def sequence(seed: int) -> list[int]:
        return draw(logits, [req(seed=seed, output=[0] * step) for step in range(40)])

    assert sequence(1) != sequence(2)
    assert len(set(sequence(1))) > vocab // 2  # the steps of one seed differ too
    assert len(set(draws(logits, n=200))) == vocab  # 200 seeds reach every token


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


# 7 degrees of freedom: P(chi2 > 30) is about 1e-4, and the draws are fixed by their seeds.
CHI2_LIMIT = 30.0
LOGITS8 = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.8])
def test_seeded_draws_follow_softmax_over_temperature(temperature):
    probs = torch.softmax(LOGITS8 / temperature, dim=-1)
    across_seeds = draws(LOGITS8, n=4000, temperature=temperature)
    assert _chi_square(across_seeds, probs) < CHI2_LIMIT
    across_steps = draw(LOGITS8, [req(seed=5, output=[0] * step, temperature=temperature) for step in range(4000)])
    assert _chi_square(across_steps, probs) < CHI2_LIMIT


def test_the_chi_square_check_can_tell_a_wrong_temperature():
    tokens = draws(LOGITS8, n=4000, temperature=1.0)
    assert _chi_square(tokens, torch.softmax(LOGITS8 / 1.3, dim=-1)) > CHI2_LIMIT


# ---- top-k, top-p, min-p ---------------------------------------------------------------


def test_top_k_1_is_greedy():
    rows = random_logits(50, 20, seed=4, scale=0.5)
    sampled = draw(rows, [req(seed=s, temperature=2.0, top_k=1) for s in range(50)])
    assert sampled == rows.argmax(dim=-1).tolist()


def test_top_k_never_leaves_the_k_best():
    logits = random_logits(1, 12, seed=5, scale=0.3)[0]
    best3 = set(logits.topk(3).indices.tolist())
    seen = set(draws(logits, n=2000, temperature=3.0, top_k=3))
    assert seen == best3


@pytest.mark.parametrize(
    "top_p, allowed",
    [(0.5, {1}), (0.6, {1, 2}), (0.8, {1, 2}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2})],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_top_p(top_p, allowed):
    logits = log_probs(0.2, 0.5, 0.3)  # sorted: token 1 (0.5), token 2 (0.3), token 0 (0.2)
    assert set(draws(logits, n=1000, top_p=top_p)) == allowed


def test_top_p_renormalizes_inside_the_nucleus():
    tokens = draws(log_probs(0.2, 0.5, 0.3), n=4000, top_p=0.6)
    share = tokens.count(1) / len(tokens)
    assert abs(share - 0.5 / 0.8) < 0.03


def test_a_top_p_1_row_keeps_its_whole_distribution_beside_a_top_p_row():
    # A long tail makes the float32 cumulative sum overshoot the total; a row that asked for
    # no nucleus must still not lose those tokens because its neighbour asked for one.
    vocab = 50_000
    rows = random_logits(2, vocab, seed=3, scale=4.0)
    probs = torch.softmax(rows, dim=-1)
    batch = batch_of([req(seed=1), req(seed=2, top_p=0.5)], vocab)
    assert torch.equal(_filter(probs, batch)[0], probs[0])


@pytest.mark.parametrize("min_p, allowed", [(0.2, {0, 1, 2, 3}), (0.3, {0, 1, 2}), (0.6, {0, 1}), (1.0, {0})])
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(min_p, allowed):
    logits = log_probs(0.4, 0.3, 0.2, 0.1)  # min_p 0.3 -> threshold 0.12; 0.6 -> 0.24
    assert set(draws(logits, n=1000, min_p=min_p)) == allowed


def test_min_p_keeps_tokens_exactly_at_the_threshold():
    assert set(draws(torch.tensor([1.0, 1.0, 0.0]), n=200, min_p=1.0)) == {0, 1}


# ---- penalties and biases --------------------------------------------------------------


def test_frequency_and_presence_penalties_follow_openai():
    vocab = 8
    logits = random_logits(1, vocab, seed=7)
    r = req(prompt=[1, 1, 6], output=[2, 2, 2, 5], frequency_penalty=0.5, presence_penalty=0.25)
    expected = logits.clone()
    expected[0, 2] -= 3 * 0.5 + 0.25  # count * frequency + presence
    expected[0, 5] -= 1 * 0.5 + 0.25
    # prompt tokens (1, 6) are not penalized: OpenAI counts the sampled text only
    torch.testing.assert_close(apply_logits_processors(logits, batch_of([r], vocab)), expected)


def test_negative_penalties_encourage_repeats():
    logits = torch.zeros(1, 4)
    r = req(output=[3], frequency_penalty=-1.0, presence_penalty=-0.5)
    torch.testing.assert_close(apply_logits_processors(logits, batch_of([r], 4)), torch.tensor([[0.0, 0.0, 0.0, 1.5]]))


def test_repetition_penalty_follows_hf_on_prompt_and_output_tokens():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 5.0, 0.0]])
    r = req(prompt=[0, 1, 5], output=[2, 2], repetition_penalty=2.0)
    # seen once or many times, the same factor: positive logits divided, negative multiplied
    expected = torch.tensor([[1.0, -2.0, 1.5, -4.0, 5.0, 0.0]])
    torch.testing.assert_close(apply_logits_processors(logits, batch_of([r], 6)), expected)


def test_penalties_only_touch_their_own_row():
    logits = random_logits(2, 8, seed=8)
    reqs = [req(prompt=[0, 1], output=[2, 3], frequency_penalty=1.0, presence_penalty=1.0, repetition_penalty=1.7), req()]
    out = apply_logits_processors(logits, batch_of(reqs, 8))
    assert torch.equal(out[1], logits[1])
    assert not torch.equal(out[0], logits[0])


def test_logit_bias_adds_to_the_logits():
    logits = random_logits(1, 8, seed=9)
    r = req(logit_bias={1: 2.5, 6: -1.0})
    expected = logits.clone()
    expected[0, 1] += 2.5
    expected[0, 6] -= 1.0
    torch.testing.assert_close(apply_logits_processors(logits, batch_of([r], 8)), expected)
    assert draw(torch.zeros(8), [req(temperature=0, logit_bias={4: 0.1})]) == [4]
    # a strong negative bias bans a token from sampling
    assert 0 not in draws(torch.zeros(8), n=500, logit_bias={0: -100.0})


def test_min_new_tokens_suppresses_stop_ids_until_reached():
    logits = torch.tensor([0.0, 0.0, 5.0, 0.0, 4.0, 0.0])  # stop token 2 leads, then 4
    stops = [2, 3]
    for produced in range(3):
        early = req(temperature=0, output=[0] * produced, stop_ids=stops, min_new_tokens=3)
        assert draw(logits, [early]) == [4]
    assert draw(logits, [req(temperature=0, output=[0] * 3, stop_ids=stops, min_new_tokens=3)]) == [2]
    sampled = draws(torch.zeros(6), n=500, stop_ids=stops, min_new_tokens=1)
    assert not set(sampled) & set(stops)
    assert set(sampled) == {0, 1, 4, 5}


# ---- log-probabilities ----------------------------------------------------------------


def test_token_logprobs_are_log_softmax_of_raw_logits_with_top_n_per_row():
    vocab = 10
    logits = random_logits(3, vocab, seed=10)
    next_ids = torch.tensor([4, 0, 9])
    result = token_logprobs(logits, next_ids, [0, 2, 5])
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i, token in enumerate(next_ids.tolist()):
        assert result.chosen[i] == pytest.approx(float(reference[i, token]), abs=1e-5)
    assert [len(t) for t in result.top] == [0, 2, 5]
    for i in (1, 2):
        ids = [t for t, _ in result.top[i]]
        assert ids == reference[i].argsort(descending=True)[: len(ids)].tolist()
        for token, lp in result.top[i]:
            assert lp == pytest.approx(float(reference[i, token]), abs=1e-5)


def test_token_logprobs_without_top_and_beyond_the_vocabulary():
    logits = random_logits(2, 4, seed=11)
    assert token_logprobs(logits, torch.tensor([0, 1]), [0, 0]).top == [[], []]
    assert token_logprobs(logits, torch.tensor([0, 1]), [-1, 2]).top[0] == []  # negative asks for none
    everything = token_logprobs(logits, torch.tensor([0, 1]), [0, 10]).top
    assert everything[0] == [] and sorted(t for t, _ in everything[1]) == [0, 1, 2, 3]


# ---- SamplingParams ---------------------------------------------------------------------


def test_from_dict_defaults_and_conversions():
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert SamplingParams.from_dict({}) == SamplingParams()
    params = SamplingParams.from_dict({"stop": "\n\n", "logit_bias": {"12": 1, "3": -2.5}, "stop_token_ids": None})
    assert params.stop == ["\n\n"]
    assert params.logit_bias == {12: 1.0, 3: -2.5}
    assert all(type(k) is int for k in params.logit_bias)
    assert params.stop_token_ids == []


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match="unknown sampling parameter.*temprature"):
        SamplingParams.from_dict({"temprature": 0.5, "top_p": 0.9})


@pytest.mark.parametrize(
    "values, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
    ],
)
def test_from_dict_rejects_each_invalid_value_naming_the_field(values, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams.from_dict(values)


def test_boundary_values_are_accepted():
    SamplingParams.from_dict(
        {"temperature": 0, "top_p": 1, "top_k": 1, "min_p": 1, "max_new_tokens": 0, "min_new_tokens": 0,
         "frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 2, "seed": 0, "n": 1}
    )


def test_validate_rejects_token_ids_outside_the_vocabulary():
    SamplingParams(stop_token_ids=[0, 99], logit_bias={99: 1.0}).validate(vocab_size=100)
    for params in (SamplingParams(stop_token_ids=[100]), SamplingParams(logit_bias={100: 1.0}), SamplingParams(stop_token_ids=[-1])):
        params.validate()  # without a vocabulary there is nothing to check against
        with pytest.raises(ValueError, match="vocabulary"):
            params.validate(vocab_size=100)


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=1, temperature=0.8).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
