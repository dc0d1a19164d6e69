"""Fixtures for the streams unit tests: the project's own Schema Registry, in-process on a free port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.serde import AvroSerde, SchemaRegistryClient


@pytest.fixture
def registry_url(tmp_path: Path) -> Iterator[str]:
    """The real registry (infra/schema_registry.py, the one the stack runs), serving from tmp_path."""
    from infra.schema_registry import PREFIX, make_server

    server = make_server("127.0.0.1", 0, tmp_path / "registry.json")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def serde(registry_url: str) -> AvroSerde:
    return AvroSerde(SchemaRegistryClient(registry_url))
