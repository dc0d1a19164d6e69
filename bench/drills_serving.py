"""Serving under a failure drill (issue #20): one real `ugt serve` on the drill's stack, asked at a steady rate.

The Redis-master drill (bench/drills_jobs.py) runs a ServingLoad beside the jobs: `ugt serve` (thread engine, the
default config: direct Redis state reads and the popularity model, over the cluster profile's Redis Cluster) on
the stack's serving port, and a thread that POSTs /recommend for the stream's users, round robin, at `rate`
requests/s with a short client timeout, from before the kill until after the dead node rejoined. Every answer is
kept with its time; `summary` counts them against the kill and the failover:

* fallback_answers: answers with the fallback flag set because of the failure: any reason but unknown_user, and
  unknown_user for a user the model had already answered (a known user's state that went missing);
* unknown_user answers of users the stream had not reached yet are counted apart (the stream's own progress);
* http_5xx (every one a defect), http_4xx, no_answer (timeouts, refused connections: also defects);
* the window of the failure's fallbacks, in seconds from the kill, beside the failover time: by when each call was
  sent (fallback_window_s: a call sent just before the kill may be answered by a fallback after it) and by when
  its answer came back (fallback_answered_window_s).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import requests

from infra.settings import REPO_ROOT, Settings

UNKNOWN_USER = "unknown_user"  # serving.service.UNKNOWN_USER (bench may import serving; a string keeps it light)
HEALTH_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Asked:
    """One /recommend call: when (monotonic), for whom, and what came back."""

    at: float
    user: str
    status: int | None  # None: no HTTP answer (timeout, connection refused)
    fallback: bool = False
    reason: str | None = None
    done: float | None = None  # when the answer (or the error) came back; None: same as `at`

    @property
    def answered(self) -> float:
        return self.at if self.done is None else self.done


def reason_windows(fallbacks: list[Asked], killed_at: float) -> dict[str, list[float]]:
    """Per fallback reason, the first and last answer's time from the kill: tells the failover's state_unavailable
    from load-shedding (overloaded, timeout) on a busy box."""
    times: dict[str, list[float]] = {}
    for asked in fallbacks:
        times.setdefault(str(asked.reason), []).append(asked.answered - killed_at)
    return {reason: [round(min(ts), 2), round(max(ts), 2)] for reason, ts in times.items()}


FALLBACK_GRACE_S = 5.0  # serving's clients learn a new slot owner on their next error; a call on the dead node ends
# at serving's 1 s request timeout


def in_window(t: float, window: list[float] | None) -> bool:
    """Whether ``t`` (seconds from the kill) lies in ``window`` [start, end], extended by FALLBACK_GRACE_S."""
    return window is not None and window[0] <= t <= window[1] + FALLBACK_GRACE_S


class ServingLoad:
    """`ugt serve` on ``s.serving_port`` and a thread asking it for ``users`` at ``rate`` requests/s."""

    def __init__(self, s: Settings, domain: str, users: list[str], rate: float = 30.0, timeout_s: float = 3.0):
        self.s, self.domain, self.users, self.rate, self.timeout_s = s, domain, users, rate, timeout_s
        self.url = f"http://127.0.0.1:{s.serving_port}"
        self.asked: list[Asked] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: subprocess.Popen | None = None
        self._log = None

    def start_server(self) -> None:
        """Start `ugt serve` and wait until /health answers (200 or 503: before the stream, nothing is known)."""
        env = {**os.environ, "UGT_SERVING_DEFAULT_DOMAIN": self.domain, "UGT_SERVING_ENGINE": "thread"}
        self.s.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.s.log_dir / f"serve-drill-{self.s.serving_port}.log", "wb")  # noqa: SIM115
        self._server = subprocess.Popen([sys.executable, "-m", "ugt", "serve", "--port", str(self.s.serving_port)],
                                        cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(f"drill: ugt serve exited ({self._server.returncode}); see {self._log.name}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"drill: ugt serve at {self.url} not answering in {HEALTH_TIMEOUT_S:.0f} s")
            time.sleep(0.5)

    def start_asking(self) -> None:
        self._thread = threading.Thread(target=self._ask_loop, name="drill-serving", daemon=True)
        self._thread.start()

    def _ask_loop(self) -> None:
        session = requests.Session()
        started, n = time.monotonic(), 0
        while not self._stop.is_set():
            ahead = n / self.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            user = self.users[n % len(self.users)]
            n += 1
            at = time.monotonic()
            try:
                response = session.post(f"{self.url}/recommend", json={"user_id": user, "k": 10},
                                         timeout=self.timeout_s)
            except requests.RequestException:
                self.asked.append(Asked(at, user, None, done=time.monotonic()))
                continue
            body: dict[str, Any] = {}
            if response.status_code == 200:
                try:
                    body = response.json()
                except ValueError:
                    body = {}
            self.asked.append(Asked(at, user, response.status_code, bool(body.get("fallback")),
                                    body.get("fallback_reason"), done=time.monotonic()))

    def stop(self) -> None:
        """Stop asking and stop the server (SIGTERM, then SIGKILL after 30 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait(timeout=10)
        if self._log is not None:
            self._log.close()

    def summary(self, killed_at: float, failover_s: float, rejoin_s: list[float] | None = None) -> dict[str, Any]:
        """Counts of the answers, and the failure's fallbacks placed against the kill (``killed_at``, monotonic): those
        answered within ``FALLBACK_GRACE_S`` of the failover, or of the killed node's restart and rejoin (``rejoin_s``,
        seconds from the kill), are the failover window's; any other is counted in ``fallbacks_outside_windows``."""
        answered_by_model: set[str] = set()
        failure_fallbacks: list[Asked] = []
        new_users = 0
        for asked in self.asked:  # in time order: one thread appends
            if asked.status != 200:
                continue
            if not asked.fallback:
                answered_by_model.add(asked.user)
            elif asked.reason == UNKNOWN_USER and asked.user not in answered_by_model:
                new_users += 1
            else:
                failure_fallbacks.append(asked)
        statuses = Counter(a.status for a in self.asked)
        after = [a for a in self.asked if a.at > killed_at + failover_s and a.status == 200]
        first_model_after = next((a.at - killed_at for a in after if not a.fallback), None)
        window = ([round(failure_fallbacks[0].at - killed_at, 2), round(failure_fallbacks[-1].at - killed_at, 2)]
                  if failure_fallbacks else None)
        answered = sorted(a.answered - killed_at for a in failure_fallbacks)
        window_end = killed_at + max(failover_s, window[1] if window else 0.0)
        before = [a for a in self.asked if a.at < killed_at]
        return {
            "serving_answers": len(self.asked),
            "serving_answers_before_kill": len(before),
            "serving_model_answers": sum(1 for a in self.asked if a.status == 200 and not a.fallback),
            "fallback_answers": len(failure_fallbacks),
            "fallback_reasons": dict(Counter(a.reason for a in failure_fallbacks)),
            "fallback_window_s": window,
            "fallback_answered_window_s": [round(answered[0], 2), round(answered[-1], 2)] if answered else None,
            "fallback_answered_by_reason_s": reason_windows(failure_fallbacks, killed_at),
            "rejoin_s": None if rejoin_s is None else [round(t, 2) for t in rejoin_s],
            "fallbacks_during_rejoin": sum(1 for t in answered if in_window(t, rejoin_s)),
            "fallbacks_outside_windows": sum(1 for t in answered
                                             if not (in_window(t, [0.0, failover_s]) or in_window(t, rejoin_s))),
            "unknown_user_not_yet_streamed": new_users,
            "http_5xx": sum(n for code, n in statuses.items() if code is not None and code >= 500),
            "http_4xx": sum(n for code, n in statuses.items() if code is not None and 400 <= code < 500),
            "no_answer": statuses.get(None, 0),
            "model_again_s": None if first_model_after is None else round(first_model_after, 2),
            "model_answers_after_window": sum(1 for a in after if a.at > window_end and not a.fallback),
            "serving_span_s": round(self.asked[-1].at - killed_at, 2) if self.asked else None,
            "serving_rate": self.rate,
        }
