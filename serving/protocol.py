"""The request bodies the gateway checks before routing: OpenAI's standard fields, typed and bounded.

Only what OpenAI documents is checked here (so a bad request fails fast, with the field named, before
a router or backend sees it); every field, including engine-specific extensions such as vLLM's
`top_k`, is passed through to the backend unchanged, and the backend validates the rest.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal, TypeVar, get_args

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.requests import ClientDisconnect, Request

from serving.errors import OpenAIError, validation_message

# Upper bounds of the schema: what no request needs, so a request beyond them is refused before any
# work (a router holding 150,000 messages, n = 128 generations). The config can cap max_tokens lower,
# per key and for the gateway (`check_max_tokens`).
MAX_TOKENS = 1 << 20
MAX_N = 16
MAX_MESSAGES = 2048
MAX_PARTS = 256  # content parts of one message
MAX_TOOLS = 128  # OpenAI's documented limit
MAX_STOP = 16
MAX_PROMPTS = 128  # texts (or token lists) of one completions request
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class ChatMessage(_Open):
    role: Role = Field(description="one of " + ", ".join(get_args(Role)))
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_PARTS)] | None = None
    name: str | None = None


class _Sampling(_Open):
    model: str = Field(
        min_length=1, max_length=256, description="an expert, or a routing model such as `auto`"
    )
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    user: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None


_Texts = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
_Tokens = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | _Texts
        | _Tokens
        | Annotated[list[_Tokens], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, texts, or token ids")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: StrictBool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


def _json_number(value: Any) -> Any:
    """A JSON number only: pydantic would take "5" or true for 5 or 1, which the schema forbids (2.0 is
    an integer in JSON Schema, and stays one here)."""
    if isinstance(value, (bool, str)):
        raise ValueError("Input should be a number")
    return value


class _StrictOpen(_Open):
    """Responses and Messages bodies: their number fields take JSON numbers only (see `_json_number`)."""


class InputText(_StrictOpen):
    type: Literal["input_text"]
    text: str


class ResponseInputMessage(_StrictOpen):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputText], Field(min_length=1, max_length=MAX_PARTS)]


class ResponsesRequest(_StrictOpen):
    """`POST /v1/responses` (OpenAI's Responses API): the fields checked here; the rest goes to the engine."""

    model: str = Field(
        min_length=1, max_length=256, description="an expert, or a routing model such as `auto`"
    )
    input: str | Annotated[list[ResponseInputMessage], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description="text, or input messages"
    )
    instructions: str | None = None
    previous_response_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="continue a response this gateway answered: served by the expert that holds it",
    )
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: StrictBool | None = False
    store: StrictBool | None = None
    background: Literal[False] | None = Field(None, description="background mode is not supported")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256)

    _numbers = field_validator("max_output_tokens", "temperature", "top_p", mode="before")(_json_number)


class TextBlock(_StrictOpen):
    type: Literal["text"]
    text: str


class AnthropicMessage(_StrictOpen):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[TextBlock], Field(min_length=1, max_length=MAX_PARTS)]


class AnthropicMetadata(_StrictOpen):
    user_id: str | None = Field(None, max_length=256)


class MessagesRequest(_StrictOpen):
    """`POST /v1/messages` (Anthropic's Messages API): the fields checked here; the rest goes to the engine."""

    model: str = Field(
        min_length=1, max_length=256, description="an expert, or a routing model such as `auto`"
    )
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    system: str | Annotated[list[TextBlock], Field(min_length=1, max_length=MAX_PARTS)] | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1 << 20)
    stream: StrictBool | None = False
    metadata: AnthropicMetadata | None = None

    _numbers = field_validator("max_tokens", "temperature", "top_p", "top_k", mode="before")(_json_number)


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a score and/or a label for an answered request."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={  # a score or a label that is not null (`{"score": null}` is refused)
            "anyOf": [
                {"required": ["score"], "properties": {"score": {"type": "number"}}},
                {"required": ["label"], "properties": {"label": {"type": "string"}}},
            ]
        },
    )
    request_id: str = Field(
        min_length=1, max_length=64, description="the answer's x-moerge-request-id (or moerge.request_id)"
    )
    score: float | None = Field(None, ge=-1e6, le=1e6, description="e.g. 1 = good, 0 = bad, or a rating")
    label: str | None = Field(None, min_length=1, max_length=64, description="e.g. thumbs_up, wrong_expert")

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.score is None and self.label is None:
            raise ValueError("give a `score`, a `label`, or both")
        return self


TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def declared(body: BaseModel, name: str) -> Any:
    """A field's checked value, None when the body's model has no such field (an unknown field a client
    sent by that name is extra, unchecked data: never read it as if it were checked)."""
    return getattr(body, name) if name in type(body).model_fields else None


def check_max_tokens(body: BaseModel, cap: int | None) -> None:
    """400 naming the field when a request asks for more tokens than the key or the gateway allows."""
    if cap is None:
        return
    for field in TOKEN_FIELDS:
        value = declared(body, field)
        if value is not None and value > cap:
            raise OpenAIError(
                400,
                f"Invalid value for '{field}': at most {cap} tokens may be asked for here, not {value}.",
                param=field,
                code="invalid_value",
            )


# What a request without max_tokens reserves for its answer (it is charged what it really uses after).
DEFAULT_COMPLETION_RESERVE = 256


def reserved_tokens(body: BaseModel, raw_bytes: int) -> int:
    """Tokens a request may use, for the key's token budget: a prompt estimate plus its completions.

    The prompt is estimated from the body's size (about 4 bytes a token for English text and JSON),
    an over-estimate for most requests: the unused part is refunded when the answer's usage is known.
    """
    asked = [declared(body, f) for f in TOKEN_FIELDS]
    completion = min((a for a in asked if a is not None), default=DEFAULT_COMPLETION_RESERVE)
    return raw_bytes // 4 + completion * (declared(body, "n") or 1)


def prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    """What a router sees of a completions prompt: the (first) text as one user turn."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return [{"role": "user", "content": prompt if isinstance(prompt, str) else ""}]


Body = TypeVar("Body", bound=BaseModel)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: Request, model: type[Body]) -> tuple[dict[str, Any], Body]:
    """The raw JSON object (forwarded as is) and its checked view; 400 in OpenAI's shape otherwise.

    Parsed by hand rather than by FastAPI so that the backend receives exactly the client's fields
    (the content type is checked before: serving/limits.py answers 415 to anything but JSON).
    """
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client left mid-upload: counted as 499 (it gets no answer), not 500
        raise OpenAIError(499, "The client closed the connection before sending the whole body.") from None
    if len(raw) > OFF_LOOP_BYTES:  # parse where it cannot stall every other request
        return await asyncio.to_thread(decode_body, raw, model)
    return decode_body(raw, model)


# Bodies larger than this are parsed in a worker thread (a 4 MB body takes ~0.1 s or more to parse).
OFF_LOOP_BYTES = 64 * 1024


def decode_body(raw: bytes, model: type[Body]) -> tuple[dict[str, Any], Body]:
    """Parse and check a request body; 400 in OpenAI's shape naming the field otherwise."""
    try:
        payload = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as err:
        raise OpenAIError(
            400, f"We could not parse the JSON body of your request: {err}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        body = model.model_validate(payload)
    except ValidationError as err:
        details: list[dict[str, Any]] = [dict(e) for e in err.errors(include_url=False, include_input=False)]
        message, param, code = validation_message(details)
        raise OpenAIError(400, message, param=param, code=code) from None
    return payload, body


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body parsed by hand: a reference to the model's schema (see install_openapi_schemas)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_openapi_schemas(
    app: FastAPI, models: list[type[BaseModel]], max_tokens: int | None = None
) -> None:
    """Add the request models (and their nested models) to the app's OpenAPI components.

    The document describes what this gateway accepts: with a `server.max_tokens` cap, that cap is the
    published maximum of `max_tokens` and `max_completion_tokens` (per-key caps can be lower still).
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
                if max_tokens is not None:
                    _cap_token_fields(js, max_tokens)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _cap_token_fields(schema: dict[str, Any], cap: int) -> None:
    for name in TOKEN_FIELDS:
        field = schema.get("properties", {}).get(name)
        for option in field.get("anyOf", [field]) if field else []:
            if option.get("type") == "integer":
                option["maximum"] = cap
