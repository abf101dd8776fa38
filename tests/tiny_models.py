"""Tiny random-weight models, built from configs and saved as ordinary HF folders.

Weights are drawn with a large ``initializer_range`` so that logits are well spread
and greedy choices are not decided by rounding noise.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from tiny_builder import COMMON as _COMMON, VOCAB, byte_tokenizer, save_tiny_model  # noqa: E402,F401 (shared with the sweep)

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
    # Attention sinks, alternating sliding-window layers, MoE experts with biases.
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 6},
}

# Architectures whose checkpoints transformers converts when it loads them: save_pretrained
# writes the hub's layout (one tensor per expert, legacy names) and from_pretrained merges
# the experts into fused 3-D parameters or renames. Four experts, two per token.
CONVERTED_ARCHITECTURES: dict[str, dict] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "use_sliding_window": False,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    # Over ten experts: experts.10 must be stacked after experts.9, not after experts.1.
    "olmoe": {"num_experts": 12, "num_experts_per_tok": 2, "intermediate_size": 32},
    "gpt_neox": {"num_key_value_heads": 4},  # lm_head is saved as embed_out
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
    },
}


def build_tiny_model(model_type: str, directory: str, **overrides) -> str:
    """Save a random ``model_type`` model (float32) and a byte tokenizer into ``directory``."""
    architecture = {**ARCHITECTURES, **CONVERTED_ARCHITECTURES}.get(model_type, {})
    config = AutoConfig.for_model(model_type, **{**_COMMON, **architecture, **overrides})
    return save_tiny_model(config, directory)


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
