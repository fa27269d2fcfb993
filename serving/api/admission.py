"""Admission control: the search API sheds the load it cannot serve in time.

Past capacity, a queue only grows every request's latency until all of them miss the
deadline. `Admission` lets `max_in_flight` requests work at once; one more waits at most
`max_wait_s` for a slot (so a burst smooths out), and past that, or when `max_waiting`
requests are already waiting, it is refused at once with 503 and `Retry-After`: the client
backs off and the admitted requests keep their latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge

from serving.api.errors import ApiError


class Overloaded(ApiError):
    """More requests than the stack can serve within its deadline: retry after a moment."""

    status = 503
    retry_after_s = 1


class Admission:
    def __init__(self, max_in_flight: int, max_wait_s: float, max_waiting: int,
                 in_flight: Gauge | None = None, shed: Counter | None = None) -> None:
        if max_in_flight < 1 or max_waiting < 0 or max_wait_s < 0:
            raise ValueError(f"admission needs max_in_flight >= 1 and non-negative waits, got "
                             f"{max_in_flight=}, {max_wait_s=}, {max_waiting=}")
        self.max_in_flight, self.max_wait_s, self.max_waiting = (max_in_flight, max_wait_s,
                                                                 max_waiting)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._waiting = 0
        self._in_flight, self._shed = in_flight, shed

    def _refuse(self, why: str) -> Overloaded:
        if self._shed is not None:
            self._shed.inc()
        return Overloaded(f"overloaded: {why}; {self.max_in_flight} requests in flight is "
                          f"this server's capacity; retry after {Overloaded.retry_after_s} s")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the slots while the body runs; `Overloaded` when none frees in time."""
        if self._slots.locked():
            if self._waiting >= self.max_waiting:
                raise self._refuse(f"{self._waiting} requests already waiting")
            self._waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.max_wait_s)
            except TimeoutError:  # the cancelled acquire holds nothing
                raise self._refuse(
                    f"no slot freed within {self.max_wait_s * 1000:.0f} ms") from None
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        if self._in_flight is not None:
            self._in_flight.inc()
        try:
            yield
        finally:
            self._slots.release()
            if self._in_flight is not None:
                self._in_flight.dec()
