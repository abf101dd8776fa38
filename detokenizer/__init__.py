"""The detokenizer process (installed as ``srt.detokenizer``): token ids to text, stop strings."""
