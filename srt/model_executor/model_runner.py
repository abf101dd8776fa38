"""ModelRunner: one rank's model, KV memory and attention backend; runs a ForwardBatch to logits."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time

import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from srt.layers.attention.base import create_attention_backend
from srt.layers.attention.interface import AttentionContext, UnsupportedAttention
from srt.layers.cpu_weight_packing import PackableWeight, pack_linear_weights
from srt.lora.manager import LoRAManager
from srt.mem_cache.memory_pool import KVCache, KVSlotAllocator, ReqToTokenPool
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.memory_plan import MemoryPlan, plan_memory
from srt.model_executor.pooling import EncoderForward, decoder_head
from srt.multimodal.encoder import VisionEncoder
from srt.model_loader.config import ModelShape, checkpoint_dtype, load_config, model_shape
from srt.model_loader.loader import is_encoder, is_vision_language, language_model, load_model
from srt.model_loader.model_task import ModelTask, resolve_task
from srt.platform import device as devices
from srt.platform.distributed import TPGroup
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, server_args: ServerArgs, model_path: str, tp_group: TPGroup, gpu_id: int = 0) -> None:
        self.server_args = server_args
        self.device = devices.resolve_device(server_args.device, gpu_id)
        self.config = load_config(model_path, server_args.trust_remote_code, server_args.revision)
        self.dtype = devices.resolve_dtype(server_args.dtype, checkpoint_dtype(self.config), self.device)
        self.kv_dtype = devices.resolve_kv_dtype(server_args.kv_cache_dtype, self.dtype)
        self.shape: ModelShape = model_shape(self.config, tp_group.size, server_args.context_length)
        self.generation_config = _generation_config(model_path)
        self.task: ModelTask = resolve_task(self.config, model_path, server_args.is_embedding, server_args.pooling)
        backend = server_args.attention_backend
        if backend == "auto":
            backend = devices.default_attention_backend(self.device)
        # This model's own attention function and forward state: no other model sees them.
        self.attention = AttentionContext(create_attention_backend(backend))

        start = time.perf_counter()
        self.model = load_model(
            model_path,
            self.config,
            self.dtype,
            self.device,
            tp_group,
            self.attention.name,
            server_args.trust_remote_code,
            server_args.ep_size,
            self.task.kind,
        )
        self.is_encoder = is_encoder(self.model)
        # Images: the model's vision tower, unless its attention over image tokens is one srt does not compute.
        self.vision: VisionEncoder | None = None
        self.image_refusal = f"{type(self.model).__name__} takes no images"
        if self.task.kind == "generate" and is_vision_language(self.config):
            self.image_refusal = _image_attention_refusal(self.model)
            self.vision = VisionEncoder(self.model, self.config, self.device, self.dtype)
        self.lora: LoRAManager | None = None
        if server_args.enable_lora:
            if self.task.is_pooling:
                raise ValueError(f"--enable-lora serves generation models; {type(self.model).__name__} is a pooling model here")
            self.lora = LoRAManager(self.model, server_args, self.device, self.dtype)  # before memory is planned: its slots take some
        if self.task.is_pooling and self.task.pooling is None:
            self.task.pooling = "cls" if self.is_encoder else "last"
        if devices.prepacks_linear_weights(self.device, self.dtype):
            pack_linear_weights(self.model)
        if server_args.enable_torch_compile:
            compile_decoder_layers(self.model)
        logger.info(
            "loaded %s (%s, %s) in %.1fs",
            type(self.model).__name__,
            self.dtype,
            self.device,
            time.perf_counter() - start,
        )
        # What the transformer's output goes through: the classification model's base model and head.
        self.backbone = self.model
        self.head: torch.nn.Module | None = None
        if self.task.kind == "classify":
            self.backbone = getattr(self.model, self.model.base_model_prefix)
            self.head = None if self.is_encoder else decoder_head(self.model, self.backbone)
        if self.is_encoder:  # run whole and padded (pooling.py): no KV cache
            pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
            self.encoder = EncoderForward(self.model, self.task, pad, self.device)
            context = self._encoder_context_length(server_args.context_length)
            self.plan = MemoryPlan(0, server_args.max_running_requests or 256, context)
            return
        self.kv_shape = self._probe_kv_shape()
        self.plan = plan_memory(server_args, self.kv_shape, self.kv_dtype, self.shape.context_length, self.device, tp_group)
        self.req_to_token_pool = ReqToTokenPool(self.plan.max_running_requests + 1, self.plan.context_length + 1, self.device)
        self.allocator = KVSlotAllocator(self.plan.max_total_tokens, self.device)
        self.kv_cache = KVCache(self.plan.max_total_tokens, *self.kv_shape, self.kv_dtype, self.device)

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (packed GEMM weights counted in their packed form)."""
        tensors = [*self.model.parameters()]  # plain weights freed by packing have no elements left
        tensors += [m.packed_weight for m in self.model.modules() if isinstance(m, PackableWeight) and m.packed_weight is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def _probe_kv_shape(self) -> tuple[int, int, int, int]:
        """(layers, kv heads, head dim, v head dim) of this rank, as the model really produces them.

        One token goes through the model with a cache that only records shapes, so TP
        plans that shard, replicate or gather K/V need no special cases here. The same
        forward is where a model is refused for attention srt does not implement (the
        attention function raises on it), at start-up rather than while serving.
        """
        probe = _KVShapeProbe()
        one = torch.zeros(1, dtype=torch.int64, device=self.device)
        batch = ForwardBatch(one, one, one, one, one + 1, [0], [1], one.view(1, 1), kv_cache=None)  # type: ignore[arg-type]
        try:
            with self.attention.running(batch, backend=probe):
                self._call(one, one, logits_to_keep=1)
        except UnsupportedAttention as e:
            raise ValueError(f"{type(self.model).__name__} cannot be served by srt: {e}") from e
        _refuse_inconsistent_layers(type(self.model).__name__, self.config, probe)
        layers = getattr(self.config.get_text_config(), "num_hidden_layers", None)
        if layers is not None and sorted(probe.shapes) != list(range(layers)):
            # A layer that never reaches the attention interface mixes tokens some other way
            # (a recurrent or convolutional mixer) that would need state kept per request.
            silent = sorted(set(range(layers)) - set(probe.shapes))
            raise ValueError(
                f"{type(self.model).__name__}: layers {silent[:8]} do not attend through transformers' attention "
                "interface (recurrent or convolutional token mixers?); srt has no per-request recurrent-state pool"
            )
        shapes = set(probe.shapes.values())
        if len(shapes) != 1:
            raise ValueError(f"layers with different K/V shapes are not supported: {probe.shapes}")
        kv_heads, head_dim, v_head_dim = shapes.pop()
        return len(probe.shapes), kv_heads, head_dim, v_head_dim

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits ``[rows, vocab]`` at ``batch.logit_rows`` (by default each request's last new
        token); a pooling model's hidden states ``[rows, hidden]`` there instead, which ``score`` finishes."""
        adapters = contextlib.nullcontext()
        if self.lora is not None and batch.lora_adapters is not None:
            adapters = self.lora.running(batch.lora_adapters, batch.extend_lens)
        with self.attention.running(batch), adapters:
            if self.task.is_pooling:
                return self._call(batch.input_ids, batch.positions).last_hidden_state[0, batch.logit_rows]
            positions = batch.positions if batch.mrope_positions is None else batch.mrope_positions[:, None]
            if batch.image_rows is None:
                out = self._call(batch.input_ids, positions, logits_to_keep=batch.logit_rows)
            else:
                out = self._call(None, positions, inputs_embeds=self._embed_with_images(batch), logits_to_keep=batch.logit_rows)
        return out.logits[0].float()

    def _call(self, input_ids: torch.Tensor | None, positions: torch.Tensor, **kwargs: object):
        """The packed batch through the model (a pooling model's transformer only: its head pools)."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids[None]
        return self.backbone(position_ids=positions[None] if positions.dim() == 1 else positions, use_cache=False, **kwargs)

    def _embed_with_images(self, batch: ForwardBatch) -> torch.Tensor:
        """The batch's token embeddings with image features at the image tokens, as the model's
        own forward merges them (so a prompt chunk may hold part of an image)."""
        embeds = self.model.get_input_embeddings()(batch.input_ids[None])
        embeds[0, batch.image_rows] = batch.image_features.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """A decoder pooling model's output ``[rows, dim]`` float32 from its pooled hidden states:
        the classification head's logits, or the embeddings themselves (unnormalised)."""
        return (pooled if self.head is None else self.head(pooled.to(self.dtype))).float()

    @property
    def output_dim(self) -> int:
        """Width of a pooling model's output: labels of a classifier, else the hidden size."""
        return len(self.task.labels) if self.task.kind == "classify" else self.config.get_text_config().hidden_size

    def _encoder_context_length(self, requested: int | None) -> int:
        """The longest input the encoder's position embeddings hold, tried at start-up: a model
        that numbers positions from its padding index (RoBERTa) holds pad_token_id + 1 fewer."""
        limit = requested or self.shape.context_length
        pad = self.encoder.pad_token_id
        for length in dict.fromkeys((limit, limit - pad - 1)):
            try:
                self.encoder([[(pad + 1) % self.shape.vocab_size] * length], [None])
                return length
            except (IndexError, RuntimeError) as e:
                failure = e
        raise ValueError(f"{type(self.model).__name__} cannot encode {limit} tokens (context length): {failure}")


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` every decoder layer (the modules the model repeats) with dynamic shapes,
    so norms, rotary embeddings, activations and residual adds fuse around the GEMMs. The
    attention function is left to run eagerly (a graph break), and one compiled graph
    serves every layer and every batch size."""
    layers = _repeated_layers(language_model(model))  # not a vision tower's
    if layers is None:
        logger.warning("--enable-torch-compile: no decoder layer list found in %s; running eagerly", type(model).__name__)
        return
    for layer in layers:
        layer.compile(dynamic=True)
    logger.info("torch.compile: %d decoder layers (compiled on first use)", len(layers))


def _repeated_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's longest ModuleList: its stack of decoder layers."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len, default=None)


class _KVShapeProbe:
    """The attention backend during ``_probe_kv_shape``: records K/V shapes, attends to nothing."""

    def __init__(self) -> None:
        self.shapes: dict[int, tuple[int, int, int]] = {}
        self.calls: dict[int, int] = {}  # attention calls per layer
        self.windows: dict[int, int | None] = {}  # the sliding window each layer attends with

    def store(self, batch: ForwardBatch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.shapes[layer] = (k.shape[1], k.shape[2], v.shape[2])
        self.calls[layer] = self.calls.get(layer, 0) + 1

    def prepare(self, batch: ForwardBatch) -> None:
        pass

    def forward(self, q: torch.Tensor, layer: int, batch: ForwardBatch, scaling: float, window: int | None, *_) -> torch.Tensor:
        self.windows[layer] = window
        return q.new_zeros(q.shape[0], q.shape[1], self.shapes[layer][2])


def _refuse_inconsistent_layers(model_name: str, config: PretrainedConfig, probe: _KVShapeProbe) -> None:
    """Refuse layers that srt's one K/V entry per layer and token cannot reproduce.

    - A layer that calls attention twice (DiffLlama: the same keys with two halves of the
      values) would overwrite its first values in the cache with its second ones.
    - A layer whose cache transformers itself cuts to a sliding window while its attention
      gets no window (Moshi) attends over the whole prompt in prefill but only the window
      while decoding: transformers disagrees with itself past the window, so no answer is right.
    """
    repeated = sorted(layer for layer, n in probe.calls.items() if n > 1)
    if repeated:
        raise ValueError(
            f"{model_name} calls attention {probe.calls[repeated[0]]} times in layer {repeated[0]} (with different "
            "values); srt caches one K/V per layer and token"
        )
    try:
        _, cache_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        return
    for layer, kwargs in enumerate(cache_kwargs):
        cached = kwargs.get("sliding_window")
        if cached is not None and layer in probe.windows and probe.windows[layer] != cached:
            raise ValueError(
                f"{model_name}: transformers keeps only the last sliding_window={cached} tokens of layer {layer} in its "
                f"cache, but the layer's attention is given window {probe.windows[layer]}: generation past the window "
                "would disagree with a full forward"
            )


def _image_attention_refusal(model: torch.nn.Module) -> str | None:
    """Why srt refuses images for this vision-language model, or None. A forward that takes the
    processor's ``token_type_ids`` (Gemma 3, PaliGemma) lets an image's tokens attend to each
    other both ways, which the causal paged attention does not compute."""
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__} attends bidirectionally within images (token_type_ids), which srt does not implement"
    return None


def _generation_config(model_path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the model config's ids apply
        return None
