"""A private redis-server on a free port for one test (no stack): for tests that need only a Redis of their own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_redis(folder: Path) -> Iterator[redis.Redis]:
    """A client of a fresh redis-server (no persistence) that answers PING; stopped on exit."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (infra/install.sh)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=15)
