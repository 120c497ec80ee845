"""Backend health: a circuit breaker per backend, fed by request outcomes and a periodic probe.

Closed: requests flow. After `failure_threshold` consecutive failures the breaker opens and the
backend is skipped (its fallback serves) for `reset_after_s`; then one trial request (half-open)
decides whether it closes again. A failed health probe opens it at once; a successful probe closes a
breaker that a failed probe opened (the backend is back: no need to wait for traffic to test it), but
not one that failing requests opened: a backend whose /health answers while its requests fail must
still pass the half-open trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    reset_after_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False
    last_error: str | None = None
    healthy: bool | None = field(default=None)  # last probe result; None before the first probe
    opened_by_probe: bool = False  # open because a probe failed (not requests): a good probe closes it

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.reset_after_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """May a request go to this backend now? In half-open, only one trial at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.opened_by_probe = False
        self.trial_in_flight = False
        self.last_error = None

    def record_failure(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        self.trial_in_flight = False
        if self.opened_at is not None or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
            self.opened_by_probe = False

    def record_probe(self, ok: bool, error: str = "health probe failed") -> None:
        """A probe that fails opens the breaker at once; one that succeeds closes it if a probe opened it."""
        self.healthy = ok
        if ok:
            if self.opened_at is not None and self.opened_by_probe:
                self.record_success()
        else:
            self.opened_by_probe = self.opened_at is None or self.opened_by_probe
            self.last_error = error
            self.failures = max(self.failures, self.failure_threshold)
            self.opened_at = self.clock()
            self.trial_in_flight = False

    @property
    def up(self) -> bool:
        return self.healthy is not False and self.state is not BreakerState.OPEN
