"""Tiny random pooling models (embedding, classification, encoders) saved as ordinary HF folders,
and transformers' own outputs for them: the oracle of the pooling tests."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from tokenizers import processors
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from tiny_models import VOCAB, byte_tokenizer

_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, initializer_range=0.3)
CLS, SEP, PAD = 1, 2, 0  # the byte tokenizer's bos / eos / pad, used as [CLS] / [SEP] / [PAD]

# model_type -> config overrides of the tiny encoders.
ENCODERS: dict[str, dict] = {
    "bert": {"max_position_embeddings": 128, "pad_token_id": PAD},
    "roberta": {"max_position_embeddings": 130, "pad_token_id": 1, "type_vocab_size": 1},
    "modernbert": {
        "max_position_embeddings": 128, "pad_token_id": PAD, "bos_token_id": CLS, "eos_token_id": SEP, "cls_token_id": CLS,
        "sep_token_id": SEP, "local_attention": 8, "global_attn_every_n_layers": 2, "classifier_pooling": "mean",
    },
}  # fmt: skip
DECODERS: dict[str, dict] = {
    "llama": {"num_key_value_heads": 2, "pad_token_id": PAD},
    "qwen2": {"num_key_value_heads": 2, "use_sliding_window": False, "pad_token_id": PAD},
}


def build_pooling_model(
    model_type: str,
    directory: str,
    head: str = "embed",
    sentence_transformers: dict | None = None,
    **overrides,
) -> str:
    """Save a random float32 ``model_type`` model: a base model (``head="embed"``), a sequence
    classifier (``head="classify"``) or a masked LM (``head="masked_lm"``), with a byte tokenizer that joins pairs as BERT's
    does (``[CLS] a [SEP] b [SEP]``, segment ids for encoders that have them).
    ``sentence_transformers``: ``{"pooling": "mean", "normalize": True}`` writes modules.json and
    1_Pooling/config.json."""
    architecture = {**ENCODERS, **DECODERS}[model_type]
    config = AutoConfig.for_model(model_type, **{**_SMALL, **architecture, **overrides})
    torch.manual_seed(0)
    cls = {"classify": AutoModelForSequenceClassification, "masked_lm": AutoModelForMaskedLM}.get(head, AutoModel)
    model = cls.from_config(config, dtype=torch.float32, attn_implementation="eager")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer = byte_tokenizer()
    if model_type in ENCODERS:
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
        )
        names = ["input_ids", "token_type_ids", "attention_mask"] if getattr(config, "type_vocab_size", 1) > 1 else ["input_ids", "attention_mask"]
        tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = names  # init_kwargs: saved with it
    tokenizer.save_pretrained(directory)
    if sentence_transformers is not None:
        _write_sentence_transformers(directory, config.hidden_size, **sentence_transformers)
    return directory


def _write_sentence_transformers(directory: str, width: int, pooling: str, normalize: bool = True) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(directory, "modules.json"), "w") as f:
        json.dump(modules, f)
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
    with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": width, **{key: key == modes[pooling] for key in modes.values()}}, f)


@torch.inference_mode()
def reference_embeddings(directory: str, inputs: list[list[int]], pooling: str, normalize: bool = True) -> torch.Tensor:
    """transformers' base model run on each input alone (no padding), pooled and normalised."""
    model = AutoModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    for ids in inputs:
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        rows.append({"cls": hidden[0], "last": hidden[-1], "mean": hidden.mean(0)}[pooling])
    out = torch.stack(rows)
    return F.normalize(out, dim=-1) if normalize else out


@torch.inference_mode()
def reference_scores(directory: str, inputs: list[list[int]], token_types: list[list[int]] | None = None) -> torch.Tensor:
    """transformers' sequence classifier run on each input alone: its logits ``[inputs, labels]``."""
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    rows = []
    for i, ids in enumerate(inputs):
        extra = {"token_type_ids": torch.tensor([token_types[i]])} if token_types else {}
        rows.append(model(input_ids=torch.tensor([ids]), **extra).logits[0])
    return torch.stack(rows)
