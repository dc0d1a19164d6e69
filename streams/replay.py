"""Replay events in event-time order: as fast as possible, or on a time scale (speed 1000 = 1000x real time).

The pacing rule is a pure function of (event times, speed, clock) so it is tested with a fake clock:
event i is due at ``start + virtual_i / speed`` where ``virtual`` is the event time elapsed since the first
event, each gap capped at ``max_gap_s`` (so a dataset's idle months do not stall a demo). An event that is
already late is sent at once; the replay never sleeps to "catch up" backwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

Clock = Callable[[], float]
Sleep = Callable[[float], None]
MIN_SLEEP_S = 0.001  # below this, sleeping costs more than it paces
MAX_SLEEP_CHUNK_S = 0.2  # wake up this often during long gaps to serve delivery reports


@dataclass
class Pacer:
    """When each event is due, given its event time (ms). ``speed=None`` means as fast as possible."""

    speed: float | None = None
    max_gap_s: float | None = None
    clock: Clock = time.monotonic
    start: float | None = None
    _first_ms: int | None = None
    _last_ms: int | None = None
    _virtual_s: float = 0.0
    _due_at: float = 0.0
    max_behind_s: float = 0.0

    def __post_init__(self) -> None:
        if self.speed is not None and self.speed <= 0:
            raise ValueError(f"speed must be > 0 (or None for as fast as possible), got {self.speed}")
        if self.max_gap_s is not None and self.max_gap_s < 0:
            raise ValueError(f"max_gap_s must be >= 0, got {self.max_gap_s}")

    def due(self, event_time_ms: int) -> float:
        """The wall-clock time (on ``clock``) at which this event should be sent."""
        if self.start is None:
            self.start = self.clock()
        if self._last_ms is None:
            self._first_ms = self._last_ms = event_time_ms
        gap_s = max(0.0, (event_time_ms - self._last_ms) / 1000.0)  # out-of-order events do not rewind
        if self.max_gap_s is not None:
            gap_s = min(gap_s, self.max_gap_s)
        self._virtual_s += gap_s
        self._last_ms = max(self._last_ms, event_time_ms)
        self._due_at = self.start if self.speed is None else self.start + self._virtual_s / self.speed
        return self._due_at

    def wait_s(self, event_time_ms: int) -> float:
        """Seconds to wait before sending this event (0 if due or late); tracks how far behind we fell."""
        delay = self.due(event_time_ms) - self.clock()
        if delay < 0 and self.speed is not None:
            self.max_behind_s = max(self.max_behind_s, -delay)
        return max(0.0, delay)

    def remaining_s(self) -> float:
        """Seconds until the event last passed to due() is due (negative once it is)."""
        return self._due_at - self.clock()


@dataclass
class ReplayResult:
    count: int
    seconds: float
    slept_s: float
    max_behind_s: float
    first_event_ms: int | None
    last_event_ms: int | None

    @property
    def events_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")

    def line(self, what: str = "events") -> str:
        return f"{self.count:,} {what} in {self.seconds:.2f} s = {self.events_per_s:,.0f} {what}/s"


def in_event_time_order(events: Iterable[dict[str, Any]], time_field: str = "event_time") -> list[dict[str, Any]]:
    """Events sorted by event time; ties keep their input order (a stable sort)."""
    return sorted(events, key=lambda e: e[time_field])


def replay(
    events: Iterable[dict[str, Any]],
    send: Callable[[dict[str, Any]], None],
    *,
    speed: float | None = None,
    max_gap_s: float | None = None,
    time_field: str = "event_time",
    total: int | None = None,
    idle: Callable[[], Any] | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    progress: bool = True,
    desc: str = "replay",
) -> ReplayResult:
    """Send every event through ``send`` paced by event time; ``idle`` runs during waits (delivery reports)."""
    pacer = Pacer(speed, max_gap_s, clock)
    count = 0
    slept = 0.0
    first = last = None
    start = clock()
    bar = tqdm(total=total, desc=desc, unit="ev", unit_scale=True, disable=not progress, mininterval=0.5)
    try:
        for event in events:
            t = int(event[time_field])
            if speed is not None:
                wait = pacer.wait_s(t)
                while wait >= MIN_SLEEP_S:
                    chunk = min(wait, MAX_SLEEP_CHUNK_S)
                    sleep(chunk)
                    slept += chunk
                    if idle is not None:
                        idle()
                    wait = pacer.remaining_s()
            send(event)
            first = t if first is None else first
            last = t
            count += 1
            if count % 2000 == 0:
                bar.update(2000)
    finally:
        bar.update(count % 2000)
        bar.close()
    return ReplayResult(count, clock() - start, slept, pacer.max_behind_s, first, last)


def schedule(event_times_ms: Iterable[int], speed: float | None, max_gap_s: float | None = None) -> Iterator[float]:
    """The send offsets (s from the first event) that ``replay`` aims for: the pacing rule on its own."""
    pacer = Pacer(speed, max_gap_s, clock=lambda: 0.0)
    for t in event_times_ms:
        yield pacer.due(t)
