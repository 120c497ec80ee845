"""Turn whatever a client sent into the one string a router encodes, without ever raising.

Clients send arbitrary JSON: missing roles, non-string content, lone surrogates, megabyte prompts. The
router must decide on all of it, so every oddity becomes a defined string plus a note in the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.base import RoutingRequest, latest_user_text

# A hard cap on characters before tokenisation: tokenising a megabyte only to keep 128 tokens wastes time.
CHARS_PER_TOKEN_CAP = 16


@dataclass(frozen=True)
class RoutingText:
    """The text a router scores, and what was done to it on the way (recorded in the decision)."""

    text: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.text.strip()


def clean_text(text: Any, max_chars: int | None = None) -> RoutingText:
    """Coerce to str, replace invalid code points, and cut very long text before tokenisation."""
    notes: dict[str, Any] = {}
    if text is None:
        text = ""
    if not isinstance(text, str):
        notes["coerced"] = type(text).__name__
        text = str(text)
    safe = text.encode("utf-8", "replace").decode("utf-8")
    if safe != text:
        notes["replaced_invalid_code_points"] = True
    if max_chars is not None and len(safe) > max_chars:  # cut the middle: the encoder keeps head and tail
        notes["chars_cut"] = len(safe) - max_chars
        safe = safe[: max_chars - max_chars // 2] + safe[len(safe) - max_chars // 2 :]
    return RoutingText(safe, notes)


def routing_text(request: Any, max_chars: int | None = None) -> RoutingText:
    """The latest user turn of a request (the multi-turn policy routes on it), cleaned; '' if none."""
    try:
        messages: Sequence[Any] = request.messages if isinstance(request, RoutingRequest) else request
        if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
            return RoutingText("", {"malformed_messages": True})
        usable = [m for m in messages if isinstance(m, dict)]
        return clean_text(latest_user_text(usable), max_chars)
    except Exception as error:  # noqa: BLE001 - the router must never raise on client input
        return RoutingText("", {"malformed_messages": repr(error)[:200]})


def context_text(request: Any, turns: int, max_chars: int | None = None) -> RoutingText | None:
    """The latest user turn followed by up to `turns` earlier user turns (most recent first), or None.

    Used when the latest turn alone is not decisive ("and in Java?", "say more"): mean pooling then
    blends the turns by length, so a short follow-up inherits its conversation's topic.
    """
    if turns <= 0:
        return None
    try:
        messages = request.messages if isinstance(request, RoutingRequest) else request
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) < 2:
            return None
        parts = [clean_text(latest_user_text([m])).text for m in reversed(users)][: turns + 1]
        joined = "\n\n".join(p for p in parts if p.strip())
        return clean_text(joined, max_chars)
    except Exception:  # noqa: BLE001 - malformed input simply has no usable context
        return None
