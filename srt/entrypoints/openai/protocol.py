"""Bodies of the OpenAI-compatible API (the part srt serves), as pydantic models.

Requests ignore unknown fields, as OpenAI's servers do, but a known field of the wrong
type or out of range fails validation, which the app answers with a 400 naming the field.
Fields that OpenAI, SGLang or vLLM define and srt cannot honour yet are declared anyway,
so that ``unsupported()`` can refuse them by name instead of silently ignoring them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 128  # choices per prompt: each is a full generation, so bound the fan-out of one request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat, which vLLM applies to completions too

# ---- requests -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema travels as ``schema`` (a pydantic name clash)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # OpenAI's default: any JSON
    strict: bool | None = None  # srt always constrains to the schema, strict or not


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model (SGLang is as lenient)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # JSON object keys are strings; pydantic turns "123" into the token id 123.
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    # SGLang / vLLM extensions, checked by srt.sampling.sampling_params like /generate's.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None

    # Constrained decoding (SGLang's extensions): the output matches the regex, the JSON schema
    # (an object, or its JSON text) or the EBNF grammar.
    regex: str | None = None
    json_schema: dict[str, Any] | str | None = None
    ebnf: str | None = None

    response_format: ResponseFormat | None = None  # OpenAI's on chat; SGLang and vLLM take it on completions too

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    def unsupported(self) -> str | None:
        """The first field that asks for something srt cannot do yet, or None."""
        return next((name for name in self.UNSUPPORTED if getattr(self, name) not in (None, False)), None)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    UNSUPPORTED = ("suffix",)


class ImageURL(BaseModel):
    url: str  # a data: URI (base64), or a file under --allowed-local-media-path
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides the resolution


class ContentPart(BaseModel):
    """One part of a message's content: ``{"type": "text", "text": ...}`` or, for a model that
    takes images, ``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any]  # JSON text, as OpenAI sends it (an object is taken too)


class MessageToolCall(BaseModel):
    """A call an earlier assistant turn made."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # of a tool message: the call it answers
    tool_calls: list[MessageToolCall] | None = None
    reasoning_content: str | None = None  # an earlier turn's thinking, for templates that render it


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object; None: no arguments
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError("parameters must be the JSON Schema of an object (type: object)")
        return schema


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (SGLang / vLLM)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools, else none
    parallel_tool_calls: bool | None = None  # false: at most one call (None: true)
    separate_reasoning: bool = True  # SGLang's: with --reasoning-parser, thinking goes to reasoning_content


# ---- responses ------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "srt"
    max_model_len: int
    root: str | None = None  # a LoRA adapter's folder
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    # With echo the prompt's tokens come first; its first token has no logprob (null), as in OpenAI's API.
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # per token: the top-n and the token itself
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None  # SGLang's extension: the stop string or token id that ended it


class CompletionResponse(BaseModel):
    """A whole completion, and also the shape of each streamed chunk (as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ChatToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    reasoning_content: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason
    matched_stop: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None  # the next piece of the arguments' JSON text


class DeltaToolCall(BaseModel):
    """A call's first delta has its id, type and name; the next ones pieces of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
