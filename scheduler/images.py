"""Images in the scheduler: what a request's image tokens are keyed by in the prefix cache,
when the vision tower runs, and which rows of a forward its features replace.

- Cache keys: each image token is keyed by a value derived from its image's hash (negative,
  so it never equals a real token id). The same image in a later request is a prefix hit;
  another image never is. When the processor did not say how many tokens each image has,
  every image token is keyed by one hash of all the prompt's images.
- The vision tower runs for a request in the step whose prefill first computes one of its
  image tokens (image tokens the prefix cache holds need no features), over all its images,
  and the features are kept until the prompt is computed. Any chunk of the prompt then takes
  the rows it covers, so chunked prefill may split an image. A retracted request computes
  them again when it comes back.
"""

from __future__ import annotations

import bisect
import hashlib
import logging

import torch

from srt.model_executor.model_runner import ModelRunner
from srt.runtime.image_inputs import MultimodalInputs
from srt.scheduler.req import Req

logger = logging.getLogger(__name__)


class SchedulerImages:
    def __init__(self, runner: ModelRunner) -> None:
        self.vision = runner.vision
        self.refusal = runner.image_refusal
        self.device = runner.device

    def attach(self, req: Req, inputs: MultimodalInputs | None) -> str | None:
        """Give the request its images (and M-RoPE positions); the reason it is refused, or None."""
        if inputs is None:
            return None  # text only: on every M-RoPE axis its positions are the plain ones
        if self.refusal is not None:
            return self.refusal
        positions = [i for i, t in enumerate(req.input_ids) if t == self.vision.image_token_id]
        if not positions:
            return "the request has images but its prompt has no image tokens"
        req.multimodal, req.image_positions = inputs, positions
        req.cache_prompt_ids = _cache_prompt_ids(req.input_ids, positions, inputs)
        if self.vision.has_mrope:
            try:
                req.mrope_positions, req.mrope_delta = self.vision.mrope_positions(req.input_ids, inputs)
            except (ValueError, RuntimeError, IndexError) as e:
                return f"the model cannot place these images' tokens: {e}"
        return None

    def encode(self, batch: list[Req]) -> list[tuple[Req, str]]:
        """Run the vision tower for the requests whose image tokens this prefill computes first;
        the requests it fails for, with why (the caller ends them)."""
        failed = []
        for req in batch:
            if req.multimodal is None or req.image_features is not None:
                continue
            first = bisect.bisect_left(req.image_positions, req.kv_len)
            if first == len(req.image_positions) or req.image_positions[first] >= req.kv_len + req.extend_len:
                continue  # this step computes none of its image tokens (the cache held them, or a later chunk)
            try:
                req.image_features = self.vision.features(req.multimodal, len(req.image_positions))
            except (ValueError, RuntimeError, TypeError) as e:
                logger.warning("request %s: the vision tower failed: %s", req.rid, e)
                failed.append((req, f"the images cannot be encoded: {e}"))
        return failed

    def release(self, batch: list[Req]) -> None:
        """Drop the features of requests whose prompt is computed."""
        for req in batch:
            if req.image_features is not None and req.kv_len >= len(req.input_ids):
                req.image_features = None

    def forward_fields(self, batch: list[Req]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(image_rows, image_features, mrope_positions)`` of a ForwardBatch over ``batch`` (each
        request's ``extend_len`` tokens from ``kv_len`` on, packed in order)."""
        rows, features, axes = [], [], []
        mrope = any(r.mrope_positions is not None for r in batch)
        offset = 0
        for req in batch:
            start, end = req.kv_len, req.kv_len + req.extend_len
            if req.image_features is not None:
                lo = bisect.bisect_left(req.image_positions, start)
                hi = bisect.bisect_left(req.image_positions, end)
                rows.extend(offset + p - start for p in req.image_positions[lo:hi])
                features.append(req.image_features[lo:hi])
            if mrope:
                axes.append(_mrope_slice(req, start, end, self.device))
            offset += end - start
        image_rows = torch.tensor(rows, dtype=torch.int64, device=self.device) if rows else None
        image_features = torch.cat(features) if rows else None
        return image_rows, image_features, torch.cat(axes, dim=1) if mrope else None


def _mrope_slice(req: Req, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Positions ``[3, end - start]``: the prompt's own, then each axis at position + delta."""
    prompt = req.mrope_positions
    known = prompt.shape[1] if prompt is not None else 0
    parts = [prompt[:, start:min(end, known)]] if start < known else []
    if end > known:
        after = torch.arange(max(start, known), end, device=device) + req.mrope_delta
        parts.append(after.expand(3, -1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _cache_prompt_ids(input_ids: list[int], positions: list[int], inputs: MultimodalInputs) -> list[int]:
    counts = inputs.image_token_counts
    if counts is None or len(counts) != len(inputs.image_hashes) or sum(counts) != len(positions):
        combined = hashlib.blake2b(repr(inputs.image_hashes).encode(), digest_size=8).digest()
        keys = [int.from_bytes(combined, "little") >> 1] * len(positions)
    else:
        keys = [h for h, n in zip(inputs.image_hashes, counts) for _ in range(n)]
    ids = list(input_ids)
    for position, key in zip(positions, keys):
        ids[position] = -1 - key
    return ids
