"""The scheduler process (installed as ``srt.scheduler``): batching, prefix cache, model worker."""
