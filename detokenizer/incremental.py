"""Incremental detokenization of one request: output token ids in, text deltas out.

Streaming text is harder than calling `tokenizer.decode` on the ids seen so far:

* Byte-level BPE can split one character over several tokens, and decoding the
  first part gives U+FFFD. Such text is held back until the character completes.
* Some decoders drop the leading space of the first token they see (SentencePiece's
  "▁"), so output tokens are decoded after a few prompt tokens whose text is cut away.
* Stop strings can span tokens. The scheduler decides which one ended the request
  (``find_stop`` on its decoded tail); here text that could still be the start of a
  stop string is held back, and the output is cut where the named one starts.

Each step decodes only a short window of recent tokens (vLLM's prefix_offset /
read_offset scheme), so the cost of a step does not grow with the output length.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded ahead of the output as context; vLLM and SGLang use 5 too.
CONTEXT_TOKENS = 5

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokStep:
    """What one `IncrementalDetokenizer.step` produced."""

    # Text that is safe to show now; it follows all earlier deltas.
    text_delta: str
    # The stop string that ended the request in this step, if one did.
    matched_stop: str | None = None


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Returns (start, stop string) of the stop string that completes first in ``text``.

    "First" is where the match ends, as if text arrived a character at a time, so the
    result does not depend on how tokens were chunked; of matches ending at the same
    place, the longer one wins.
    """
    found = [(start + len(stop), -len(stop), stop) for stop in stops if stop and (start := text.find(stop)) != -1]
    if not found:
        return None
    end, _, stop = min(found)
    return end - len(stop), stop


@dataclass
class DecodeState:
    """How far one request's token ids have been turned into text."""

    # A few prompt ids (context, never emitted), then every output id so far.
    ids: list[int]
    # ids[prefix_offset:read_offset] already have their text; they are decoded again
    # only as context, and the text of ids[read_offset:] is what the decode of
    # ids[prefix_offset:] adds to it.
    prefix_offset: int
    read_offset: int
    # Decoded text not emitted yet because it may be the start of a stop string.
    held: str = ""
    # Every delta emitted so far (a list, so that appending stays cheap).
    deltas: list[str] = field(default_factory=list)
    matched_stop: str | None = None


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, cut at the stop string that ended it."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        no_stop_trim: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # An empty stop string would end every request before its first character.
        self.stop = [s for s in stop if s]
        self.no_stop_trim = no_stop_trim
        self._max_stop_len = max(map(len, self.stop), default=0)
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.state = DecodeState(ids=context, prefix_offset=0, read_offset=len(context))

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self.state.deltas)

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the request, once one has."""
        return self.state.matched_stop

    def step(self, new_token_ids: list[int], finished: bool, stop: str | None = None) -> DetokStep:
        """Adds output tokens and returns the text that became safe to show.

        `finished=True` means no tokens will follow: everything held back is flushed,
        up to the start of `stop`, the stop string that ended the request (if one did).
        """
        state = self.state
        if state.matched_stop is not None:
            return DetokStep("")  # the request already ended at a stop string
        state.ids.extend(new_token_ids)
        state.held += self._read_new_text(finished or stop is not None)
        delta = self._release_held(finished, stop)
        state.deltas.append(delta)
        return DetokStep(delta, state.matched_stop)

    def _read_new_text(self, finished: bool) -> str:
        """Decodes ids[read_offset:] and moves the window past them when their text is whole."""
        state = self.state
        prefix_text = self._decode(state.ids[state.prefix_offset : state.read_offset])
        full_text = self._decode(state.ids[state.prefix_offset :])
        new_text = full_text[len(prefix_text) :]
        # Text ending in U+FFFD stops mid-character; wait for the tokens that complete
        # it. Tokens with no text yet (skipped special tokens) also wait: moving the
        # window onto them would leave the next real token without context.
        if not finished and (not new_text or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        state.prefix_offset, state.read_offset = state.read_offset, len(state.ids)
        return new_text

    def _release_held(self, finished: bool, stop: str | None) -> str:
        """Takes from the held text what may be shown now, ending the request at ``stop``.

        What is held back always begins at or before the start of any stop string in
        progress, so the first occurrence of ``stop`` in it is the one that ended the
        request; text already emitted needs no search."""
        state = self.state
        text = state.held
        if stop is not None:
            state.matched_stop, state.held = stop, ""
            start = text.find(stop)
            if start == -1:  # the scheduler's decoding saw it, this one does not: show everything
                return text
            return text[: start + len(stop) if self.no_stop_trim else start]
        keep = 0 if finished else self._stop_prefix_len(text)
        state.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        for size in range(min(len(text), self._max_stop_len - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stop):
                return size
        return 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )
