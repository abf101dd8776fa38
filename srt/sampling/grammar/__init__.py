"""Grammar-constrained decoding: compiled grammars, per-request matchers, token bitmasks."""
