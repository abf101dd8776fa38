"""The tokenizer every process that reads or writes text loads: the TokenizerManager, the
detokenizer, and the schedulers (stop strings)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer at ``path``; a folder without one is a clear error that says what to do."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"no tokenizer could be loaded from {path} ({reason}); give one with --tokenizer-path, "
            "or start with --skip-tokenizer-init to serve token ids only"
        ) from e
