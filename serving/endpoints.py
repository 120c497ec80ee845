"""The model endpoints as protocols: what differs between chat, completions, Responses and Messages.

Every model endpoint goes through one request lifecycle (serving/app.py, `handle`): admit (auth, rate
limit) → parse → cap and reserve tokens → route → dispatch (retries, fallbacks, breakers) → relay
(JSON or stream) → account, finished in one place. A `Protocol` is all that an endpoint adds to it: the
body it checks, the text the router reads, the changes made to the payload before it goes to a backend,
how its errors look, and how its stream events end, carry usage and report a failure.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from serving.backends.base import Endpoint, make_event
from serving.errors import OpenAIError, anthropic_body, error_body
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    MessagesRequest,
    ResponsesRequest,
    declared,
    prompt_messages,
)

if TYPE_CHECKING:
    from serving.accounting import RequestRecord
    from serving.gateway import Gateway

_SEP = (",", ":")
DONE = b"data: [DONE]\n\n"


class Protocol:
    """An OpenAI chat-style endpoint (`data:` events ending with `data: [DONE]`); subclasses differ."""

    endpoint: Endpoint = "chat"
    body: type[BaseModel] = ChatCompletionRequest
    default_token_field: str | None = "max_tokens"  # set to a capped gateway's cap when no field is given
    named_events = False  # SSE events with `event:` names (Responses, Messages)

    def routing_messages(self, body: Any) -> list[dict[str, Any]]:
        """What the router reads: OpenAI-style messages (the last user turn is the routing text)."""
        return [{"role": m.role, "content": m.content} for m in body.messages]

    def user(self, body: Any) -> str | None:
        """The end user, the sticky key of `assign_by: user` experiments."""
        user = declared(body, "user")
        return user if isinstance(user, str) else None

    def prepare(self, gateway: Gateway, payload: dict[str, Any], body: Any, cap: int | None) -> None:
        """Edit the payload sent to the backend (a capped gateway's default token limit)."""
        field = self.default_token_field
        if cap is not None and field is not None:
            asked = ("max_tokens", "max_completion_tokens", "max_output_tokens")
            if all(declared(body, f) is None for f in asked):
                payload[field] = cap  # a capped gateway never lets an answer run to the context's end

    def pinned(self, gateway: Gateway, rec: RequestRecord, body: Any) -> str | None:
        """The expert that must serve this request, bypassing routing and fallbacks (None: route it)."""
        return None

    def answered(self, gateway: Gateway, rec: RequestRecord, payload: dict[str, Any], obj: Any) -> None:
        """Called with the answer (JSON body, or the first stream event's data) of a 200."""

    def error(self, status: int, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI-shaped error body as this endpoint writes errors."""
        return body

    # -- streams ----------------------------------------------------------------------------------------
    def is_last(self, name: str | None, data: str | None) -> bool:
        """The event that completes a stream (a stream that ends without it was cut short)."""
        return data == "[DONE]"

    def usage(self, name: str | None, obj: Any) -> Any:
        """The `usage` object an event carries, if any."""
        return obj.get("usage") if isinstance(obj, dict) else None

    def is_content(self, name: str | None, obj: Any) -> bool:
        """An event that carries generated text (counted as tokens when no usage comes)."""
        return True

    def failure(self, message: str) -> list[bytes]:
        """The events that end a stream which broke off after its first event."""
        body = error_body(message, "server_error", None, "backend_stream_error")
        return [make_event(json.dumps(body, separators=_SEP)), DONE]


class CompletionsProtocol(Protocol):
    endpoint: Endpoint = "completions"
    body: type[BaseModel] = CompletionRequest

    def routing_messages(self, body: Any) -> list[dict[str, Any]]:
        return prompt_messages(body.prompt)


def _parts_text(content: Any) -> Any:
    """Content parts with text (`input_text`, Anthropic's `text`) as OpenAI `text` parts."""
    if not isinstance(content, list):
        return content
    return [{"type": "text", "text": getattr(p, "text", "")} for p in content]


class ResponsesProtocol(Protocol):
    """OpenAI's Responses API: named events (`event: response.created` ... `response.completed`)."""

    endpoint: Endpoint = "responses"
    body: type[BaseModel] = ResponsesRequest
    default_token_field = "max_output_tokens"
    named_events = True
    _LAST = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def routing_messages(self, body: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if body.instructions:
            out.append({"role": "system", "content": body.instructions})
        if isinstance(body.input, str):
            out.append({"role": "user", "content": body.input})
        else:
            out.extend({"role": m.role, "content": _parts_text(m.content)} for m in body.input)
        return out

    def prepare(self, gateway: Gateway, payload: dict[str, Any], body: Any, cap: int | None) -> None:
        super().prepare(gateway, payload, body, cap)
        # The response id is the gateway's key to the expert holding it: clients never choose it.
        payload.pop("request_id", None)
        if gateway.config.server.max_stored_responses == 0:
            payload["store"] = False

    def pinned(self, gateway: Gateway, rec: RequestRecord, body: Any) -> str | None:
        previous = body.previous_response_id
        if previous is None:
            return None
        holder = gateway.responses.holder(previous, rec.api_key)
        if holder is None or holder not in gateway.backends:
            raise OpenAIError(
                404,
                f"No response with id `{previous}`: this gateway did not answer it, or no longer keeps it "
                "(server.max_stored_responses).",
                param="previous_response_id",
                code="response_not_found",
            )
        return holder

    def answered(self, gateway: Gateway, rec: RequestRecord, payload: dict[str, Any], obj: Any) -> None:
        if not isinstance(obj, dict) or payload.get("store") is False or rec.served_expert is None:
            return
        response = obj.get("response", obj)  # a stream's first event wraps the response
        rid = response.get("id") if isinstance(response, dict) else None
        if isinstance(rid, str):
            gateway.responses.add(rid, rec.served_expert, rec.api_key)

    def is_last(self, name: str | None, data: str | None) -> bool:
        return name in self._LAST

    def usage(self, name: str | None, obj: Any) -> Any:
        if name in self._LAST and isinstance(obj, dict) and isinstance(obj.get("response"), dict):
            return obj["response"].get("usage")
        return None

    def is_content(self, name: str | None, obj: Any) -> bool:
        return name == "response.output_text.delta"

    def failure(self, message: str) -> list[bytes]:
        body = {"type": "error", "code": "backend_stream_error", "message": message, "param": None}
        return [make_event(json.dumps(body, separators=_SEP), "error")]


class MessagesProtocol(Protocol):
    """Anthropic's Messages API: named events (`message_start` ... `message_stop`), Anthropic's errors."""

    endpoint: Endpoint = "messages"
    body: type[BaseModel] = MessagesRequest
    default_token_field = None  # max_tokens is required
    named_events = True

    def routing_messages(self, body: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if body.system:
            out.append({"role": "system", "content": _parts_text(body.system)})
        out.extend({"role": m.role, "content": _parts_text(m.content)} for m in body.messages)
        return out

    def user(self, body: Any) -> str | None:
        return body.metadata.user_id if body.metadata is not None else None

    def error(self, status: int, body: dict[str, Any]) -> dict[str, Any]:
        return anthropic_body(status, body)

    def is_last(self, name: str | None, data: str | None) -> bool:
        return name == "message_stop"

    def usage(self, name: str | None, obj: Any) -> Any:
        if not isinstance(obj, dict):
            return None
        if name == "message_start" and isinstance(obj.get("message"), dict):
            return obj["message"].get("usage")
        return obj.get("usage") if name == "message_delta" else None

    def is_content(self, name: str | None, obj: Any) -> bool:
        return name == "content_block_delta"

    def failure(self, message: str) -> list[bytes]:
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return [make_event(json.dumps(body, separators=_SEP), "error")]


CHAT = Protocol()
COMPLETIONS = CompletionsProtocol()
RESPONSES = ResponsesProtocol()
MESSAGES = MessagesProtocol()
