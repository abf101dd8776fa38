"""Log-probabilities in the two shapes OpenAI answers with: the legacy completions one and chat's."""

from __future__ import annotations

from typing import Any

from srt.entrypoints.openai.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

_MIN_LOGPROB = -9999.0  # stands in for -inf, which JSON cannot carry (vLLM's choice too)


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def completion_logprobs(
    tokenizer,
    token_ids: list[int],
    logprobs: list[float | None],
    top_logprobs: list[list[tuple[int, float]] | None],
    text_offset: int,
) -> CompletionLogprobs:
    """The legacy completions shape; ``text_offset`` is where the first token starts in the choice's
    text. A None logprob (the first prompt token's, with echo) stays null, and so do its top logprobs."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    tops = []
    for token, logprob, top in zip(tokens, logprobs, top_logprobs):
        if logprob is None:
            tops.append(None)
            continue
        entry = {tokenizer.decode([t]): _finite(lp) for t, lp in top}
        # OpenAI lists the sampled token too (so up to n + 1 entries). Set last, it wins when two
        # tokens decode to the same string (say, two halves of characters, both "\ufffd").
        entry[token] = _finite(logprob)
        tops.append(entry)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if lp is None else _finite(lp) for lp in logprobs],
        top_logprobs=tops,
        text_offset=offsets,
    )


def chat_logprobs(
    tokenizer, token_ids: list[int], logprobs: list[float], top_logprobs: list[list[tuple[int, float]]]
) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        # The token's text, decoded alone: a token holding part of a character reads "\ufffd",
        # and so do its `bytes` (its raw bytes are the tokenizer's secret).
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}

    content = [
        TokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(tt, tlp)) for tt, tlp in top])
        for t, lp, top in zip(token_ids, logprobs, top_logprobs)
    ]
    return ChatLogprobs(content=content)
