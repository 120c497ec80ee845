"""API keys and per-key rate limits.

Keys are stored as sha256 hashes (a leaked config leaks no key) and compared in constant time against
every configured hash, so neither the answer nor its timing tells which prefix was right. Each key may
be limited to some models and to requests and tokens per minute (token buckets refilled continuously;
tokens are charged when the answer's usage is known, so a request may overdraw a bucket once and the
next one waits — answered 429 with Retry-After).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from serving.config import AdminKey, ApiKey
from serving.errors import OpenAIError


def hash_key(key: str) -> str:
    """The hex sha256 a config stores for `key` (what `moerge keys hash` prints)."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyRing:
    def __init__(self, keys: Mapping[str, ApiKey | AdminKey]) -> None:
        self.keys = keys
        self._hashes = [(name, bytes.fromhex(k.sha256)) for name, k in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def authenticate(self, authorization: str | None) -> str | None:
        """The key's name; None when auth is off; 401 when the key is missing or wrong."""
        if not self.enabled:
            return None
        token = bearer_token(authorization)
        if token is None:
            raise OpenAIError(
                401,
                "Missing API key: send it as `Authorization: Bearer KEY`.",
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for name, stored in self._hashes:  # no early exit: the time does not depend on which matched
            if hmac.compare_digest(presented, stored):
                found = name
        if found is None:
            raise OpenAIError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        return found

    def allowed(self, name: str | None, model: str) -> bool:
        if name is None:
            return True
        key = self.keys[name]
        models = key.models if isinstance(key, ApiKey) else None
        return models is None or model in models

    def check_model(self, name: str | None, model: str) -> None:
        if not self.allowed(name, model):
            raise OpenAIError(
                403,
                f"This API key may not use the model `{model}`.",
                param="model",
                code="model_not_allowed",
            )


@dataclass
class TokenBucket:
    """`per_minute` units, refilled continuously; the level may go negative (charged after the fact)."""

    per_minute: float
    clock: Callable[[], float] = time.monotonic
    level: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.per_minute
        self.stamp = self.clock()

    def _refill(self) -> None:
        t = self.clock()
        self.level = min(self.per_minute, self.level + (t - self.stamp) * self.per_minute / 60.0)
        self.stamp = t

    def wait_s(self, need: float) -> float:
        """Seconds until `need` units are available (0: now)."""
        self._refill()
        if self.level >= need:
            return 0.0
        return (need - self.level) * 60.0 / self.per_minute

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n


class RateLimiter:
    """Per-key request and token buckets. Keys without limits are never limited."""

    def __init__(self, keys: dict[str, ApiKey], clock: Callable[[], float] = time.monotonic) -> None:
        self.requests = {
            name: TokenBucket(k.requests_per_minute, clock)
            for name, k in keys.items()
            if k.requests_per_minute is not None
        }
        self.tokens = {
            name: TokenBucket(k.tokens_per_minute, clock)
            for name, k in keys.items()
            if k.tokens_per_minute is not None
        }

    def admit(self, name: str | None) -> None:
        """Take one request from the key's budget, or answer 429 with Retry-After (nothing is taken)."""
        if name is None:
            return
        req, tok = self.requests.get(name), self.tokens.get(name)
        wait_req = req.wait_s(1) if req is not None else 0.0
        wait_tok = tok.wait_s(0) if tok is not None else 0.0  # a budget not overdrawn admits
        wait = max(wait_req, wait_tok)
        if wait > 0:
            what = "requests" if wait_req >= wait_tok else "tokens"
            raise OpenAIError(
                429,
                f"Rate limit reached for {what} per minute on this API key; retry after {math.ceil(wait)} s.",
                code=f"rate_limit_{what}",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        if req is not None:
            req.take(1)

    def reserve_tokens(self, name: str | None, n: int) -> int:
        """Take `n` tokens (what the request may use) from the key's budget before it is served.

        Admitted only while the budget holds the reservation, so concurrent requests cannot overdraw it
        all at once; a reservation larger than the whole budget is cut to the budget (such a request
        needs a full bucket). Returns what was reserved, for `settle_tokens`; 429 if it does not fit.
        """
        tok = self.tokens.get(name) if name is not None else None
        if tok is None or n <= 0:
            return 0
        n = min(n, int(tok.per_minute))
        wait = tok.wait_s(n)
        if wait > 0:
            raise OpenAIError(
                429,
                f"Rate limit reached for tokens per minute on this API key: this request may use {n} "
                f"tokens; retry after {math.ceil(wait)} s.",
                code="rate_limit_tokens",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        tok.take(n)
        return n

    def settle_tokens(self, name: str | None, reserved: int, used: int) -> None:
        """Charge what a request used against what it reserved: the unused part goes back."""
        if name is not None and (tok := self.tokens.get(name)) is not None and used != reserved:
            tok.take(used - reserved)


def authenticate_admin(admin: KeyRing, users: KeyRing, authorization: str | None) -> str:
    """The admin key's name. 403 when the admin API is off (no admin keys) or a user key is presented
    (user keys never reach the admin API), 401 when the key is missing or unknown."""
    if not admin.enabled:
        raise OpenAIError(
            403,
            "The admin API is off: configure auth.admin_keys.",
            type="permission_error",
            code="admin_disabled",
        )
    try:
        name = admin.authenticate(authorization)
    except OpenAIError:
        if users.enabled and bearer_token(authorization) is not None:
            try:
                users.authenticate(authorization)
            except OpenAIError:
                pass
            else:
                raise OpenAIError(
                    403,
                    "This is a user key; the admin API takes admin keys only.",
                    type="permission_error",
                    code="admin_key_required",
                ) from None
        raise
    assert name is not None
    return name
