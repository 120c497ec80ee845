"""A/B experiments between routing policies: sticky, deterministic assignment of requests to arms.

An arm is picked from sha256(salt + key) alone, so the same key (a user, an API key, a header value)
lands in the same arm on every request, on every gateway replica and after every restart, without any
shared state. A second, independent hash decides whether the key is in the experiment at all
(`traffic`), so widening the traffic share keeps everyone already in their arm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from serving.config import ArmConfig, ExperimentConfig

_SCALE = float(2**64)


def unit_interval(salt: str, key: str) -> float:
    """A uniform number in [0, 1) determined by (salt, key) only."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


@dataclass(frozen=True)
class Assignment:
    experiment: str | None  # None: not attributed (disabled, or outside the traffic share)
    arm: str  # the arm whose policy serves the request (the control arm when not attributed)
    sticky: bool  # False when the request had no key and was assigned on its own
    unit: str | None = None  # salted hash of the key: the unit the report counts for the SRM check


class Experiment:
    def __init__(self, name: str, config: ExperimentConfig) -> None:
        self.name = name
        self.config = config
        self.salt = config.salt if config.salt is not None else name
        self.control: str = config.control or next(iter(config.arms))
        total = sum(arm.weight for arm in config.arms.values())
        self.shares = {arm: a.weight / total for arm, a in config.arms.items()}
        self._bounds: list[tuple[float, str]] = []
        acc = 0.0
        for arm, share in self.shares.items():
            acc += share
            self._bounds.append((acc, arm))

    def arm_config(self, arm: str) -> ArmConfig:
        return self.config.arms[arm]

    def assign(self, key: str | None, request_id: str) -> Assignment:
        """The arm for `key`; a request without a key is assigned by its own id (random, not sticky)."""
        sticky = key is not None
        k = key if key is not None else request_id
        if not self.config.enabled:
            return Assignment(None, self.control, sticky)
        if self.config.traffic < 1.0 and unit_interval(self.salt + "\x00traffic", k) >= self.config.traffic:
            return Assignment(None, self.control, sticky)
        unit = hashlib.sha256(f"{self.salt}\x00unit\x00{key}".encode()).hexdigest()[:32] if sticky else None
        return Assignment(self.name, self.pick(k), sticky, unit)

    def pick(self, key: str) -> str:
        u = unit_interval(self.salt, key)
        for bound, arm in self._bounds:
            if u < bound:
                return arm
        return self._bounds[-1][1]  # float rounding at the top end


def assignment_key(
    assign_by: str, user: str | None, headers: dict[str, str], api_key: str | None
) -> str | None:
    """The sticky key of a request for `assign_by` (user | api_key | header:NAME), or None if absent."""
    if assign_by == "user":
        return user or None
    if assign_by == "api_key":
        return api_key or None
    name = assign_by.removeprefix("header:").lower()
    return headers.get(name) or None
