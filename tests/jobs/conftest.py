"""Fixtures of the jobs' tests: a real Schema Registry (the stack's own server) in-process on a free port."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from infra.schema_registry import PREFIX, make_server
from streams.serde import AvroSerde, SchemaRegistryClient


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, tmp_path_factory.mktemp("registry") / "registry.json")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def serde(registry_url: str) -> AvroSerde:
    return AvroSerde(SchemaRegistryClient(registry_url))
