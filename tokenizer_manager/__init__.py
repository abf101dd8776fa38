"""The front of the runtime (installed as ``srt.tokenizer_manager``): tokenization and request state."""
