"""A circuit breaker: stop calling a failing service, try again after a cool-down.

Closed (calls go through) -> ``failures`` consecutive failures -> open (calls are refused at
once, so a dead Groq costs no time per utterance) -> after ``cooldown_s`` one trial is allowed
(half-open) -> a success closes it, a failure opens it again for another cool-down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Thread-safe circuit breaker.

    Args:
        failures: Consecutive failures that open the circuit.
        cooldown_s: Time open before a trial call is allowed.
        clock: Monotonic clock (tests pass a fake one).
        on_change: Called with ``(old_state, new_state)`` on every change (logs, metrics).
    """

    def __init__(
        self,
        failures: int = 3,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
    ):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.on_change = on_change
        self._state = CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._trial = False
        self.opens = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
                return HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open, only one trial at a time)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
                self._set(HALF_OPEN)
            if self._state == HALF_OPEN and not self._trial:
                self._trial = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._count, self._trial = 0, False
            self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._state == HALF_OPEN or self._count >= self.failures:
                self._opened_at, self._trial = self.clock(), False
                if self._state != OPEN:
                    self.opens += 1
                self._set(OPEN)

    def _set(self, state: str) -> None:
        old, self._state = self._state, state
        if old != state and self.on_change is not None:
            self.on_change(old, state)
