"""What a checkpoint serves: generation, embeddings or classification scores, and how it pools.

Read from the config's architecture, as transformers names it: ``*ForSequenceClassification``
scores (its head pools as transformers' does), a bare base model (``BertModel``,
``MistralModel``) embeds, and a causal LM generates unless ``--is-embedding`` makes it embed
from its base model's hidden states. Pooling and normalisation come from the
sentence-transformers files next to the weights (``modules.json``, ``1_Pooling/config.json``)
when there are any, else ``--pooling``, else the usual default: the last token for a decoder
(e5-mistral, Qwen3-Embedding), the first ([CLS]) for an encoder. A sentence-transformers
module srt does not compute (a Dense projection, max pooling) is refused by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

TaskKind = Literal["generate", "embed", "classify"]
Pooling = Literal["last", "mean", "cls"]

# sentence-transformers pooling modes srt computes, by their key in 1_Pooling/config.json.
_POOLING_MODES: dict[str, Pooling] = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}
_TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass
class ModelTask:
    kind: TaskKind
    # Embeddings: how the hidden states become one vector (None: the encoder decides when built).
    pooling: Pooling | None = None
    normalize: bool = False
    matryoshka: bool = False  # the model is trained for truncated embeddings (a request's ``dimensions``)
    labels: list[str] = field(default_factory=list)  # classification: the name of each score

    @property
    def is_pooling(self) -> bool:
        return self.kind != "generate"


def resolve_task(config: PretrainedConfig, model_path: str, is_embedding: bool, pooling: Pooling | None) -> ModelTask:
    architecture = (getattr(config, "architectures", None) or [""])[0]
    base_models = {name for names in MODEL_MAPPING_NAMES.values() for name in ([names] if isinstance(names, str) else names)}
    if architecture.endswith("ForSequenceClassification"):
        labels = [config.id2label[i] for i in range(config.num_labels)]
        return ModelTask("classify", labels=labels)
    if not (is_embedding or architecture in base_models or _sentence_transformer_modules(model_path)):
        if pooling is not None:
            raise ValueError(f"--pooling {pooling} is for embedding models; serve {architecture} with --is-embedding")
        return ModelTask("generate")
    normalize, st_pooling = _sentence_transformers_pooling(model_path)
    matryoshka = bool(getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None))
    return ModelTask("embed", pooling or st_pooling, normalize, matryoshka)


def _sentence_transformer_modules(model_path: str) -> list[dict]:
    path = os.path.join(model_path, "modules.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _sentence_transformers_pooling(model_path: str) -> tuple[bool, Pooling | None]:
    """(normalize, pooling) from the sentence-transformers modules; with none, normalised
    embeddings and the model kind's default pooling (as vLLM and SGLang serve them)."""
    modules = _sentence_transformer_modules(model_path)
    if not modules:
        return True, None
    pooling: Pooling | None = None
    normalize = False
    for module in modules:
        kind = module.get("type", "")
        if kind == _TRANSFORMER_MODULE:
            continue
        if kind == _NORMALIZE_MODULE:
            normalize = True
        elif kind == _POOLING_MODULE:
            pooling = _pooling_mode(os.path.join(model_path, module.get("path", ""), "config.json"))
        else:
            raise ValueError(f"sentence-transformers module {kind!r} (modules.json) is not implemented by srt")
    return normalize, pooling


def _pooling_mode(path: str) -> Pooling:
    with open(path) as f:
        config = json.load(f)
    on = [key for key, value in config.items() if key.startswith("pooling_mode_") and value]
    if len(on) != 1 or on[0] not in _POOLING_MODES:
        raise ValueError(f"sentence-transformers pooling {on} ({path}) is not implemented by srt: it pools by one of {sorted(_POOLING_MODES)}")
    if config.get("include_prompt", True) is False:
        raise ValueError(f"sentence-transformers pooling without the prompt (include_prompt false, {path}) is not implemented by srt")
    return _POOLING_MODES[on[0]]
