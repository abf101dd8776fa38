"""Tiny random-weight models, built from configs and saved as ordinary HF folders.

Weights are drawn with a large ``initializer_range`` so that logits are well spread
and greedy choices are not decided by rounding noise.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

VOCAB = 256

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# model_type -> config overrides; windows are shorter than the test prompts so that
# sliding-window layers really drop keys.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 12},
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 10,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 9,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"num_key_value_heads": 4, "pad_token_id": 0},
    "olmo2": {},
}


def build_tiny_model(model_type: str, directory: str, **overrides) -> str:
    """Save a random ``model_type`` model (float32) and a byte tokenizer into ``directory``."""
    config = AutoConfig.for_model(model_type, **{**_COMMON, **ARCHITECTURES[model_type], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are the 256 byte values, so any text round-trips."""
    # GPT-2's byte-to-printable-character table, which the ByteLevel pre-tokenizer emits.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(VOCAB)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=chars[1], eos_token=chars[2], pad_token=chars[0])


def load_reference(directory: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, never stopping early (no EOS, like ``ignore_eos``)."""
    # An empty list, not None: generate reads None as "unset" and stops at the model's own EOS.
    config = GenerationConfig(do_sample=False, eos_token_id=[], pad_token_id=0)
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=config,
        max_new_tokens=max_new_tokens,
    )
    return out[0, len(prompt) :].tolist()
