"""Multi-LoRA serving: PEFT adapters over the base model's parallel linears, batched per token."""
