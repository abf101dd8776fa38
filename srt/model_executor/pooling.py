"""From hidden states to what a pooling model returns: one embedding or one row of scores per input.

Decoders (causal attention) run through the paged runtime like generation models, their
hidden states pooled per request by the scheduler (``scheduler/embedding.py``); a
decoder's classification head (transformers' ``score``) is applied to the pooled state,
which is what its ``*ForSequenceClassification`` does at the last token.

Encoders run whole, as transformers runs them: a padded ``[batch, tokens]`` forward with an
attention mask, so each model's own position ids (RoBERTa counts from its padding index),
token types and heads (BERT's pooler, RoBERTa's classification head over [CLS], ModernBERT's
mean pooling) apply unchanged; there is no KV cache to fill and nothing to reuse.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from srt.model_loader.model_task import ModelTask, Pooling


def pool_padded(hidden: torch.Tensor, lengths: torch.Tensor, method: Pooling) -> torch.Tensor:
    """``[batch, tokens, hidden]`` (right-padded to ``lengths``) → ``[batch, hidden]`` float32."""
    hidden = hidden.float()
    if method == "cls":
        return hidden[:, 0]
    if method == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).unsqueeze(-1)
    return (hidden * mask).sum(1) / lengths[:, None]


def decoder_head(model: nn.Module, backbone: nn.Module) -> nn.Module:
    """The per-token head of a decoder's ``*ForSequenceClassification`` (``score``), refused when
    the model has more than a linear head around its base model (its pooling then is not the
    last-token rule the scheduler implements)."""
    heads = [(name, module) for name, module in model.named_children() if module is not backbone]
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has the head modules {[name for name, _ in heads]}; srt pools a decoder's "
            "classification through one linear head (transformers' score)"
        )
    return heads[0][1]


class EncoderForward:
    """One padded forward of a whole encoder model over a batch of inputs."""

    def __init__(self, model: nn.Module, task: ModelTask, pad_token_id: int, device: torch.device) -> None:
        self.model = model
        self.task = task
        self.pad_token_id = pad_token_id
        self.device = device
        self.takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def __call__(self, inputs: list[list[int]], token_types: list[list[int] | None]) -> torch.Tensor:
        """``[len(inputs), dim]`` float32: the pooled embedding (unnormalised) or the head's logits."""
        lengths = torch.tensor([len(ids) for ids in inputs], device=self.device)
        width = int(lengths.max())
        input_ids = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.int64, device=self.device)
        types = torch.zeros_like(input_ids)
        for i, (ids, kinds) in enumerate(zip(inputs, token_types)):
            input_ids[i, : len(ids)] = torch.tensor(ids, device=self.device)
            if kinds is not None:
                types[i, : len(kinds)] = torch.tensor(kinds, device=self.device)
        mask = (torch.arange(width, device=self.device)[None] < lengths[:, None]).long()
        extra = {"token_type_ids": types} if self.takes_token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, **extra)
        if self.task.kind == "classify":
            return out.logits.float()
        return pool_padded(out.last_hidden_state, lengths, self.task.pooling)
