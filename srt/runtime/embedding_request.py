"""EmbeddingItem: one input of a pooling request, whichever route it came through, and the
post-processing of its result (Matryoshka truncation, normalisation, label probabilities).

``/v1/embeddings``, ``/encode``, ``/classify``, ``/v1/score``, ``/v1/rerank`` and
``srt.Engine.encode`` all build items; the TokenizerManager tokenizes and checks them
(``check_embedding``) and ``encode`` returns one ``EmbeddingOutput`` each. A text pair
(query, document) is tokenized as the model's tokenizer joins pairs (with its segment ids),
which is how a cross-encoder was trained to read them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from srt.runtime.generate_request import InvalidRequestError
from srt.runtime.messages import EmbeddingOutput, SchedulerInfo


@dataclass
class EmbeddingItem:
    text: str | None = None
    input_ids: list[int] | None = None
    text_pair: str | None = None  # a second segment: the document a cross-encoder scores against ``text``
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)


def items_of(inputs: str | list[str] | list[int] | list[list[int]], param: str = "input") -> list[EmbeddingItem]:
    """OpenAI's ``input`` (and SGLang's ``text`` / ``input_ids``): a string, a list of strings, a
    list of token ids, or a list of token-id lists."""
    if isinstance(inputs, str):
        return [EmbeddingItem(text=inputs)]
    if not inputs:
        raise InvalidRequestError(f"{param} is empty", param=param)
    if all(isinstance(x, str) for x in inputs):
        return [EmbeddingItem(text=x) for x in inputs]
    if all(isinstance(x, int) for x in inputs):
        return [EmbeddingItem(input_ids=list(inputs))]
    if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in inputs):
        return [EmbeddingItem(input_ids=list(x)) for x in inputs]
    raise InvalidRequestError(f"{param} must be a string, a list of strings, or token ids", param=param)


def embedding_vector(out: EmbeddingOutput, info: SchedulerInfo, dimensions: int | None = None) -> np.ndarray:
    """The embedding a client gets: the first ``dimensions`` values (Matryoshka), normalised
    afterwards when the model normalises (as sentence-transformers truncates, then normalises)."""
    vector = np.frombuffer(out.embedding, dtype=np.float32)
    if dimensions is not None:
        vector = vector[:dimensions]
    if info.normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector


def check_dimensions(dimensions: int | None, info: SchedulerInfo) -> None:
    if dimensions is None:
        return
    if info.task != "embed":
        raise InvalidRequestError("dimensions is for embedding models", param="dimensions")
    if not info.matryoshka:
        raise InvalidRequestError(
            "this model is not trained for truncated embeddings (no is_matryoshka / matryoshka_dimensions in its config)",
            param="dimensions",
        )
    if not 1 <= dimensions <= info.output_dim:
        raise InvalidRequestError(f"dimensions must be in [1, {info.output_dim}], got {dimensions}", param="dimensions")


def label_probabilities(logits: np.ndarray) -> np.ndarray:
    """A classifier's scores as probabilities: softmax over its labels, a sigmoid for one label
    (a reward or relevance score), as vLLM's classify activation."""
    if logits.shape[-1] == 1:
        return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def logits_of(out: EmbeddingOutput) -> np.ndarray:
    return np.frombuffer(out.embedding, dtype=np.float32)


def encode_result(out: EmbeddingOutput, info: SchedulerInfo, dimensions: int | None = None) -> dict:
    """SGLang's ``encode`` result: the embedding (a classifier's raw scores, as SGLang returns a
    reward model's) and ``meta_info``."""
    values = embedding_vector(out, info, dimensions) if info.task == "embed" else logits_of(out)
    meta = {"id": out.rid, "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens}
    return {"embedding": values.tolist(), "meta_info": meta}


def is_single(inputs: object) -> bool:
    """One input (answered with one result), not a batch."""
    return isinstance(inputs, str) or (isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], int))
