"""The one router interface every routing policy implements, and the registry serving picks them from.

A router turns a chat conversation into a Decision: which expert serves it, with the scores and the
reason, so that serving can expose "why" and the A/B log can compare policies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, Any]  # an OpenAI chat message: {"role": ..., "content": str | list of parts}


@dataclass(frozen=True)
class RoutingRequest:
    """What a router sees of one request: the conversation, and the expert that served its last turn."""

    messages: Sequence[Message]
    previous_expert: str | None = None

    @classmethod
    def from_prompt(cls, prompt: str) -> RoutingRequest:
        return cls(messages=[{"role": "user", "content": prompt}])


@dataclass(frozen=True)
class Decision:
    expert: str
    scores: dict[str, float]
    confidence: float
    router: str
    version: str
    reason: str  # e.g. "classifier", "below-floor→fallback", "empty-prompt→fallback"
    details: dict[str, Any] = field(default_factory=dict)  # e.g. {"truncated": True}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Router(ABC):
    """Decides one request or a batch; must never raise on any string a client can send."""

    name: str
    version: str = "1"

    def __init__(self, experts: Sequence[str]) -> None:
        if not experts:
            raise ValueError("a router needs at least one expert")
        self.experts = list(experts)

    @abstractmethod
    def decide_batch(self, requests: Sequence[RoutingRequest]) -> list[Decision]: ...

    def decide(self, request: RoutingRequest) -> Decision:
        return self.decide_batch([request])[0]


class AsyncRouter(Router):
    """A router whose decision waits on I/O (the experts' own engines scoring the prompt), not on the CPU.

    Serving awaits `decide_async` on its event loop, each request on its own and all concurrently, rather
    than batching requests on a worker thread: batching would only queue one request's I/O behind
    another's. Like `decide_batch`, it must never raise.
    """

    @abstractmethod
    async def decide_async(self, request: RoutingRequest) -> Decision: ...


RouterFactory = Callable[..., Router]
_REGISTRY: dict[str, RouterFactory] = {}


def register(kind: str) -> Callable[[RouterFactory], RouterFactory]:
    def wrap(factory: RouterFactory) -> RouterFactory:
        _REGISTRY[kind] = factory
        return factory

    return wrap


def _load_builtin_kinds() -> None:
    """Import the module that registers every built-in kind (lazily: base must not import its users)."""
    import router.builtin  # noqa: F401


def router_kinds() -> list[str]:
    _load_builtin_kinds()
    return sorted(_REGISTRY)


def create_router(kind: str, **params: Any) -> Router:
    """Build a router by kind name (`fixed`, `random`, ..., or a trained kind with an artifact)."""
    _load_builtin_kinds()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown router kind {kind!r}; known kinds: {', '.join(router_kinds())}")
    return _REGISTRY[kind](**params)


def latest_user_text(messages: Sequence[Message]) -> str:
    """The text of the last user turn (content parts joined), or '' when there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            return ""
    return ""
