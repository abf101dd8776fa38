"""What a streaming client sees of one request's output through IncrementalDetokenizer.

Stop strings are decided as the scheduler decides them (``find_stop`` on the output
decoded so far, after each step) and cut here.

The tokenizers are trained here in a moment (no hub): a byte-level BPE, small enough
that emoji and CJK characters are split across tokens, and a SentencePiece-style
(Metaspace) BPE whose decoder drops the first token's leading space.
"""

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from srt.detokenizer.incremental import (
    CONTEXT_TOKENS,
    REPLACEMENT_CHAR,
    DetokStep,
    IncrementalDetokenizer,
    find_stop,
)

EOS, TOOL = "<|eos|>", "<|tool|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! Stop at STOP.",
    "你好世界，今天天气很好。我们的中文字符各不相同，东南西北，春夏秋冬。",
    "😀😃😄😁😆😅😂🤣👍🏽👋🏻🎉🚀🌍 emoji",
    "Café naïve résumé über façade crème brûlée",
] * 10
# Drawn from for random texts: letters, spaces, punctuation, accents, CJK, emoji
# (including a skin-tone modifier), and characters the tokenizers never saw.
ALPHABET = "ab STOP.\n,éü你好世界😀👍🏽🚀ñ¿Ω"


def train(pre_tokenizer, decoder, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, additional_special_tokens=[TOOL]
    )


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    # 300 entries leave few merges beyond the 256 bytes: most non-ASCII characters
    # take several tokens, some tokens hold part of a character.
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 300)


@pytest.fixture(scope="session")
def sp_tok() -> PreTrainedTokenizerFast:
    return train(pre_tokenizers.Metaspace(), decoders.Metaspace(), 400)


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunks: Sequence[int] = (1,)
) -> list[DetokStep]:
    """Feeds `ids` in chunks of the given sizes (repeated), the last one with finished=True; a
    chunk that completes a stop string (as the scheduler sees it) ends the stream there."""
    steps, start, i = [], 0, 0
    while True:
        end = start + chunks[i % len(chunks)]
        found = find_stop(detok.tokenizer.decode(ids[:end]), detok.stop) if detok.stop else None
        stop = found[1] if found else None
        steps.append(detok.step(ids[start:end], finished=end >= len(ids) or stop is not None, stop=stop))
        if end >= len(ids) or stop is not None:
            return steps
        start, i = end, i + 1


def joined(steps: list[DetokStep]) -> str:
    return "".join(s.text_delta for s in steps)


def char_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids with a token boundary between every two characters."""
    return [i for ch in text for i in tok.encode(ch)]


def first_stop(text: str, stops: list[str], no_stop_trim: bool) -> tuple[str, str | None]:
    """The reference: read `text` a character at a time and stop at the first stop string
    completed (the longer one if two complete together)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return (text[:end] if no_stop_trim else text[: end - len(stop)]), stop
    return text, None


# --- the stream adds up to the decoded output -------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.text(ALPHABET, max_size=12),
    output=st.text(ALPHABET, max_size=40),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_deltas_add_up_to_the_decoded_output(tok, prompt, output, chunks):
    ids = tok.encode(output)
    detok = IncrementalDetokenizer(tok, tok.encode(prompt))
    steps = stream(detok, ids, chunks)
    assert joined(steps) == tok.decode(ids) == output
    assert detok.text == output
    assert not any(REPLACEMENT_CHAR in s.text_delta for s in steps)
    assert all(s.matched_stop is None for s in steps)


@settings(max_examples=60, deadline=None)
@given(
    output=st.text(ALPHABET, max_size=30),
    specials=st.lists(st.tuples(st.integers(0, 30), st.sampled_from([EOS, TOOL])), max_size=3),
    skip_special_tokens=st.booleans(),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_special_tokens_anywhere_decode_as_tokenizer_decode(
    tok, output, specials, skip_special_tokens, chunks
):
    ids = tok.encode(output)
    for pos, special in specials:
        ids.insert(min(pos, len(ids)), tok.convert_tokens_to_ids(special))
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special_tokens)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert joined(stream(detok, ids, chunks)) == expected


def test_prompt_text_is_context_only(tok):
    prompt = tok.encode("The quick brown fox")
    detok = IncrementalDetokenizer(tok, prompt)
    assert joined(stream(detok, tok.encode(" jumps"))) == " jumps"


def hello_world(sp_tok) -> tuple[list[int], list[int]]:
    """"Hello world" tokenized, split into a prompt "Hello" and an output " world"."""
    ids = sp_tok.encode("Hello world")
    tokens = sp_tok.convert_ids_to_tokens(ids)
    split = next(i for i, t in enumerate(tokens) if t.startswith("▁w"))
    return ids[:split], ids[split:]


def test_first_token_keeps_its_leading_space_after_the_prompt(sp_tok):
    prompt, output = hello_world(sp_tok)
    # Decoded on its own, the decoder drops the leading space of the first token...
    assert sp_tok.decode(output) == "world"
    # ...but after the prompt it is a word boundary, and the client must see it.
    detok = IncrementalDetokenizer(sp_tok, prompt)
    assert joined(stream(detok, output)) == " world"


def test_skipped_special_token_does_not_cost_the_next_word_its_space(sp_tok):
    prompt, output = hello_world(sp_tok)
    detok = IncrementalDetokenizer(sp_tok, prompt, skip_special_tokens=True)
    assert detok.step([sp_tok.convert_tokens_to_ids(TOOL)], finished=False).text_delta == ""
    assert joined(stream(detok, output)) == " world"


# --- never half a character --------------------------------------------------------------


@pytest.mark.parametrize("text", ["😀👍🏽", "你好世界"])
def test_split_character_is_held_until_its_last_token(tok, text):
    ids = tok.encode(text)
    prefixes = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(p.endswith(REPLACEMENT_CHAR) for p in prefixes), "want a split character"
    detok = IncrementalDetokenizer(tok, [])
    shown = ""
    for i, token in enumerate(ids):
        step = detok.step([token], finished=False)
        assert REPLACEMENT_CHAR not in step.text_delta
        shown += step.text_delta
        # Every complete character shows as soon as its last token arrives.
        assert shown == prefixes[i].rstrip(REPLACEMENT_CHAR)
    assert shown == text


def test_finish_mid_character_flushes_what_decode_gives(tok):
    ids = tok.encode("😀")
    assert tok.decode(ids[:1]) == REPLACEMENT_CHAR
    detok = IncrementalDetokenizer(tok, [])
    assert detok.step(ids[:1], finished=False).text_delta == ""
    assert detok.step([], finished=True).text_delta == REPLACEMENT_CHAR


# --- stop strings ------------------------------------------------------------------------


def test_stop_string_across_tokens_ends_the_request_and_is_trimmed(tok):
    ids = tok.encode("Hello STOP world")
    assert not any("STOP" in tok.decode([i]) for i in ids), "want STOP split over tokens"
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    steps = stream(detok, ids)
    assert joined(steps) == "Hello "
    assert [s.matched_stop for s in steps if s.matched_stop] == ["STOP"]
    assert detok.matched_stop == "STOP" and detok.text == "Hello "


def test_no_stop_trim_keeps_the_stop_string(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"], no_stop_trim=True)
    assert joined(stream(detok, tok.encode("Hello STOP world"))) == "Hello STOP"


def test_stop_string_in_the_middle_of_a_chunk_drops_the_rest(tok):
    ids = tok.encode("Hello STOP world")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.step(ids, finished=True, stop="STOP") == DetokStep("Hello ", "STOP")


def test_tokens_after_the_stop_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    detok.step(tok.encode("a STOP"), finished=True, stop="STOP")
    assert detok.step(tok.encode(" more"), finished=True) == DetokStep("")
    assert detok.text == "a "


def test_possible_start_of_a_stop_string_is_held_then_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    deltas = [detok.step([i], finished=False).text_delta for i in char_ids(tok, "a STAR")]
    assert deltas == ["a", " ", "", "", "STA", "R"]


def test_held_start_of_a_stop_string_is_flushed_at_finish(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    steps = stream(detok, char_ids(tok, "a ST"))
    assert [s.text_delta for s in steps] == ["a", " ", "", "ST"]
    assert detok.matched_stop is None


@pytest.mark.parametrize(
    "text, stops, shown, matched",
    [
        ("hello world", ["world", "lo"], "hel", "lo"),
        ("hello world", ["lo", "world"], "hel", "lo"),
        # The stop string completed first wins, even if another one started earlier...
        ("xabcd", ["abcd", "b"], "xa", "b"),
        # ...and of two completed by the same character, the longer one.
        ("xabc", ["bc", "abc"], "x", "abc"),
    ],
)
def test_first_completed_stop_string_wins(tok, text, stops, shown, matched):
    for chunks in ([1], [len(text)]):
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        assert joined(stream(detok, char_ids(tok, text), chunks)) == shown
        assert detok.matched_stop == matched


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    output=st.text(ALPHABET, min_size=1, max_size=30),
    no_stop_trim=st.booleans(),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_stop_strings_match_a_character_at_a_time_reading(tok, data, output, no_stop_trim, chunks):
    # Stop strings are pieces of the output (so they do match) or random short texts.
    piece = st.tuples(st.integers(0, len(output)), st.integers(1, 4)).map(
        lambda t: output[t[0] : t[0] + t[1]]
    )
    stops = data.draw(st.lists(piece | st.text(ALPHABET, min_size=1, max_size=3), max_size=3))
    detok = IncrementalDetokenizer(tok, [], stop=stops, no_stop_trim=no_stop_trim)
    steps = stream(detok, tok.encode(output), chunks)
    shown, matched = first_stop(output, stops, no_stop_trim)
    assert joined(steps) == shown
    assert detok.matched_stop == matched
    assert [s.matched_stop for s in steps if s.matched_stop] == ([matched] if matched else [])


# --- decode options and cost -------------------------------------------------------------


@pytest.mark.parametrize("skip, shown", [(True, "hi there"), (False, f"hi{TOOL} there{EOS}")])
def test_skip_special_tokens(tok, skip, shown):
    tool, eos = tok.convert_tokens_to_ids(TOOL), tok.eos_token_id
    ids = tok.encode("hi") + [tool] + tok.encode(" there") + [eos]
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    assert joined(stream(detok, ids)) == shown == tok.decode(ids, skip_special_tokens=skip)


class RecordingTokenizer:
    """Wraps a tokenizer and records every decode call."""

    def __init__(self, tok: PreTrainedTokenizerFast):
        self.tok, self.calls = tok, []

    def decode(self, ids, **kwargs):
        self.calls.append((list(ids), kwargs))
        return self.tok.decode(ids, **kwargs)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_special_token_options_reach_tokenizer_decode(tok, skip, spaces):
    recorder = RecordingTokenizer(tok)
    detok = IncrementalDetokenizer(
        recorder, [], skip_special_tokens=skip, spaces_between_special_tokens=spaces
    )
    stream(detok, tok.encode("hi") + [tok.eos_token_id])
    assert recorder.calls
    expected = {"skip_special_tokens": skip, "spaces_between_special_tokens": spaces}
    assert all(kwargs == expected for _, kwargs in recorder.calls)


def test_each_step_decodes_a_short_window(tok):
    ids = tok.encode("the quick brown fox 你好 😀 " * 60)
    recorder = RecordingTokenizer(tok)
    detok = IncrementalDetokenizer(recorder, tok.encode("a prompt longer than the context"))
    assert joined(stream(detok, ids)) == tok.decode(ids)
    assert len(ids) > 500
    # Decoding everything each step would pass ever longer sequences to decode.
    assert max(len(call_ids) for call_ids, _ in recorder.calls) <= CONTEXT_TOKENS + 4
