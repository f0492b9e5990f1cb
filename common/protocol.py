"""The OpenAI protocol's requests as mgpu's own OpenAI layer reads them (the simulator's:
``gpu_worker.serving.sim`` and ``mgpu sim-server``); what it answers is :mod:`common.responses`.  A vLLM
worker speaks vLLM's own protocol instead (``gpu_worker.serving.vllm``); the gateway reads only a few
fields of a body (``gateway.admission``).

Requests are strict where OpenAI is strict: ``"5"``, ``true`` and ``3.0`` are not integers, ``"yes"``
and ``1`` are not booleans (an integer is a valid number, as in JSON).  Unknown fields are ignored, as
vLLM does; fields of the OpenAI and vLLM APIs that the simulator does not honour are refused with a 400
that names them when they ask for anything but their neutral value (``UNSUPPORTED``), never silently
dropped.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from common.errors import InvalidRequest
from common.schemas import Kind, SamplingParams

# ----------------------------------------------------------------------------- requests

# field -> the values that mean "off" (accepted; anything else is a 400 naming the field)
_OFF: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "best_of": (None, 1),
    "use_beam_search": (None, False), "top_k": (None, 0, -1), "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "length_penalty": (None, 1, 1.0), "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,), "allowed_token_ids": (None,),
    "bad_words": (None, []), "structured_outputs": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "guided_decoding_backend": (None,),
    "logits_processors": (None,), "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False),
    "vllm_xargs": (None,), "kv_transfer_params": (None,), "priority": (None, 0), "cache_salt": (None,),
    "prompt_embeds": (None,),
}
_OFF_CHAT: dict[str, tuple[Any, ...]] = {
    **_OFF, "functions": (None, []), "function_call": (None, "none"), "reasoning_effort": (None,),
    "chat_template": (None,), "chat_template_kwargs": (None, {}), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "documents": (None,), "mm_processor_kwargs": (None,), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "echo": (None, False),
}
_OFF_COMPLETION: dict[str, tuple[Any, ...]] = {**_OFF, "suffix": (None, ""),
                                               "response_format": (None, {"type": "text"})}
UNSUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {"chat": _OFF_CHAT, "completion": _OFF_COMPLETION}


class UnsupportedField(ValueError):
    """A field the client set that the simulator cannot honour (a 400 naming it, never a silent drop)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_supported(kind: Kind, body: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedField` for the first field asking for something the simulator does not do."""
    for name, off in UNSUPPORTED.get(kind, {}).items():
        if name in body and not any(_same(body[name], v) for v in off):
            raise UnsupportedField(name, f"{name}: not supported by the simulator engine (it was set to "
                                         f"{_short(body[name])}); leave it out, send its default, or use a vLLM "
                                         "worker")


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type (1 and 1.0 are the same number; True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Request(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do; known ones are checked strictly."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous(cls, v: bool) -> bool:
        if v:
            raise ValueError("continuous_usage_stats is not supported by the simulator engine")
        return v


_SEED = 2**63


class _SamplingRequest(_Request):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-_SEED, lt=_SEED)
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=512)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if not all(isinstance(x, str) for x in v):
                raise ValueError("stop sequences must be strings")
        elif v is not None and not isinstance(v, str):
            raise ValueError("must be a string or a list of strings")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The sampling parameters of this request (OpenAI defaults where it sets none)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=self.stop_list(), seed=self.seed, n=self.n,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError("a prompt of token ids is not supported by the simulator engine; send text")
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported by the simulator engine")
            if not isinstance(v[0], str):
                raise ValueError("must be a string (a list of one string is accepted too)")
        elif not isinstance(v, str):
            raise ValueError("must be a string")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def logprobs_n(self) -> int | None:
        """How many top logprobs per token (None: no logprobs)."""
        return self.logprobs


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of content parts")
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_image", "input_audio", "audio_url", "video_url", "file"):
                raise ValueError(f"part {i}: a {kind} part needs a multimodal model; this model takes text only")
            if kind != "text":
                what = f"type {kind!r}" if isinstance(kind, str) else "a part without a 'type'"
                raise ValueError(f"part {i}: {what} is not a content part this model takes (text only)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: 'text' must be a string")
        return v

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        """The message as the simulator's template reads it (tool calls as their JSON text)."""
        text = self.text()
        if self.tool_calls:
            text += "".join(f" {c.function.name}({c.function.arguments})" for c in self.tool_calls)
        d = {"role": self.role, "content": text}
        if self.name is not None:
            d["name"] = self.name
        return d


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str = Field(default="response", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when logprobs is true")
        return v

    @model_validator(mode="after")
    def _after(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: when using tool_choice, tools must be set")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name
                                                                                 for t in self.tools or ()}:
            raise ValueError(f"tool_choice: the named function {choice.function.name!r} is not in tools")
        return self

    def messages_dicts(self) -> list[dict[str, str]]:
        """The conversation as the simulator's template reads it (the tools offered, as a system line)."""
        msgs = [m.as_dict() for m in self.messages]
        if self.tools and self.tool_choice != "none":
            msgs.insert(0, {"role": "system", "content": "tools: " + " ".join(t.function.name for t in self.tools)})
        return msgs

    def logprobs_n(self) -> int | None:
        """How many top logprobs per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def forced_tool(self) -> Tool | None:
        """The tool the answer must call (``tool_choice`` required: the first; named: that one), or None."""
        choice, tools = self.tool_choice, self.tools or []
        if choice == "required" and tools:
            return tools[0]
        if isinstance(choice, NamedToolChoice):
            return next(t for t in tools if t.function.name == choice.function.name)
        return None


OpenAIRequest = CompletionRequest | ChatCompletionRequest


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The first problem, naming the field (``messages.0.content``) and the reason."""
    e = exc.errors()[0]
    param = ".".join(str(p) for p in e["loc"]) or None
    msg = str(e["msg"]).removeprefix("Value error, ")
    if param is None and (m := re.match(r"^([A-Za-z_][\w.]*): ", msg)):  # a check of the whole request names its field
        return InvalidRequest(msg, param=m.group(1))
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


def parse_request(kind: Kind, body: dict[str, Any]) -> OpenAIRequest:
    """A request body as its model; :class:`InvalidRequest` (400, naming the field) when it is not one,
    or when it asks for something the simulator does not do."""
    try:
        if kind == "chat":
            req: OpenAIRequest = ChatCompletionRequest.model_validate(body)
        elif kind == "completion":
            req = CompletionRequest.model_validate(body)
        else:
            raise InvalidRequest(f"the simulator engine does not serve {kind} requests")
        check_supported(kind, body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except UnsupportedField as exc:
        raise InvalidRequest(str(exc), param=exc.field) from None
    return req


def schema_instance(schema: Any, words: list[str], depth: int = 0) -> Any:
    """A small deterministic instance of a JSON schema (the simulator's structured output): required
    properties only, strings from ``words``, the first enum value, numbers 0, arrays empty."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema_instance(schema[key][0], words, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
        required = [k for k in schema.get("required") or [] if isinstance(k, str)]
        return {k: schema_instance(props.get(k, {}), words, depth + 1) for k in required}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return " ".join(words[:3]) if kind == "string" else None
