"""What keeps `vaelink serve` alive under load and abuse: the in-flight memory budget, the limits on
queued work, and the timeouts for slow clients.

`Budget` counts bytes that requests hold at once - bodies being read or held, their arrays, and the
engine's planned working memory - so that many large requests are refused (503, Retry-After)
instead of taking the machine's memory. It is used from the event loop only: no locks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RejectedRequestError, ServerBusyError

__all__ = ["Budget", "Guards", "Hold", "PeakHold", "default_inflight_bytes"]

MIB = 1 << 20


@dataclass(frozen=True)
class Guards:
    """Server-wide protections. `max_inflight_bytes`: the in-flight budget (None: half of the RAM
    available at start). `max_queued_pixels`: work queued or running per model, in output pixels
    (a request is still admitted when nothing else is queued). Timeouts in seconds: `body_timeout`
    between two chunks of a body, `request_timeout` from arrival to answer (None: none),
    `header_timeout` for a request's headers. `max_connections`: open connections (and requests)
    beyond which requests are answered 503. `keep_alive`: idle seconds before a connection is
    closed."""

    max_inflight_bytes: int | None = None
    max_queued_pixels: int = 128_000_000
    body_timeout: float = 30.0
    request_timeout: float | None = 300.0
    header_timeout: float = 10.0
    max_connections: int = 1000
    keep_alive: int = 5


def default_inflight_bytes() -> int:
    """Half of the RAM available now: the engine plans its own activations within the other half."""
    from ..engine import available_memory

    return available_memory() // 2


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


class Budget:
    """A capacity in bytes that requests take from and give back. A request that could never fit
    is refused with 413; one that does not fit now with `ServerBusyError` (503, Retry-After)."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("the in-flight budget must be positive")
        self.capacity = capacity
        self.used = 0
        self._on_change = on_change

    def take(self, n: int, what: str) -> None:
        if n <= 0:
            return
        if n > self.capacity:
            raise RejectedRequestError(
                f"{what} needs {_mib(n)}, more than this server's in-flight budget of "
                f"{_mib(self.capacity)}",
                413,
            )
        if self.used + n > self.capacity:
            raise ServerBusyError(
                f"server busy: {what} needs {_mib(n)}, {_mib(self.capacity - self.used)} of the "
                "in-flight memory budget is free; retry later"
            )
        self._set(self.used + n)

    def give(self, n: int) -> None:
        if n > 0:
            self._set(self.used - n)

    def _set(self, used: int) -> None:
        self.used = used
        if self._on_change is not None:
            self._on_change(used)


class Hold:
    """What one request holds: bytes of a `Budget` and other undo actions, all given back by one
    `release()` (idempotent) on every path - answered, refused, disconnected or cancelled."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.bytes = 0
        self._undo: list[Callable[[], None]] = []

    def take(self, n: int, what: str) -> None:
        self.budget.take(n, what)
        self.bytes += max(0, n)

    def defer(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def release(self) -> None:
        self.budget.give(self.bytes)
        self.bytes = 0
        while self._undo:
            self._undo.pop()()


class PeakHold:
    """Holds in a `Budget` the largest of the amounts registered now: a model's engine thread runs
    one batch at a time, so the working memory planned for its queued requests does not add up."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0
        self._amounts: Counter[int] = Counter()

    def add(self, n: int, what: str) -> Callable[[], None]:
        """Registers `n` (taking what exceeds the current peak); returns its removal."""
        extra = max(0, n - self.held)
        self.budget.take(extra, what)
        self.held += extra
        self._amounts[n] += 1

        def remove() -> None:
            self._amounts[n] -= 1
            if not self._amounts[n]:
                del self._amounts[n]
            peak = max(self._amounts, default=0)
            self.budget.give(self.held - peak)
            self.held = peak

        return remove
