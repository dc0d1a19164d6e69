"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro binary body.

Schemas live in ``schemas/*.avsc`` and are registered in a Confluent-compatible Schema Registry
(subjects follow the TopicNameStrategy: ``<topic>-value``). Decoding never trusts the bytes: each
failure raises :class:`SerdeError` with the reason code that the dead-letter record carries.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import requests

from streams.avro_decoder import DecodeFailed, Decoder, compile_decoder

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAGIC = 0
HEADER = struct.Struct(">bI")
MAX_RECORD_BYTES = 1 << 20  # anything larger is rejected as OVERSIZED before decoding


class SerdeError(ValueError):
    """A record that cannot be decoded; ``reason_code`` is BAD_MAGIC, UNKNOWN_SCHEMA, DECODE_ERROR or OVERSIZED."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason


class RegistryError(RuntimeError):
    """The Schema Registry is unreachable or refused a request."""


@cache
def schema_text(name: str) -> str:
    """The JSON text of schemas/<name>.avsc."""
    path = SCHEMA_DIR / f"{name}.avsc"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc")))
        raise FileNotFoundError(f"no schema {name!r} in {SCHEMA_DIR}; known: {known}")
    return path.read_text()


@cache
def load_schema(name: str) -> Any:
    """schemas/<name>.avsc parsed by fastavro (cached)."""
    return fastavro.parse_schema(json.loads(schema_text(name)))


def subject_for(topic: str) -> str:
    return f"{topic}-value"


class SchemaRegistryClient:
    """A minimal client of the Confluent Schema Registry REST API (works with Apicurio's ccompat API)."""

    def __init__(self, url: str, timeout_s: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._by_id: dict[int, Any] = {}
        self._id_of: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as exc:
            raise RegistryError(
                f"Schema Registry at {self.url} is unreachable ({exc.__class__.__name__}); is the stack up? "
                "Run `ugt stack up` or set UGT_REGISTRY_URL."
            ) from exc
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise RegistryError(f"{method} {path} -> {response.status_code}: {response.text[:300]}")
        return response.json()

    def register(self, subject: str, schema_json: str) -> int:
        """Register (or look up) a schema under a subject; returns its global id."""
        key = (subject, schema_json)
        with self._lock:
            if key in self._id_of:
                return self._id_of[key]
        body = {"schema": schema_json, "schemaType": "AVRO"}
        result = self._request(
            "POST", f"/subjects/{subject}/versions", json=body,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        if result is None or "id" not in result:
            raise RegistryError(f"registering a schema under {subject!r} returned {result!r}")
        schema_id = int(result["id"])
        with self._lock:
            self._id_of[key] = schema_id
            self._by_id[schema_id] = fastavro.parse_schema(json.loads(schema_json))
        return schema_id

    def schema_by_id(self, schema_id: int) -> Any | None:
        """The parsed schema with this id, or None if the registry does not know it."""
        with self._lock:
            if schema_id in self._by_id:
                return self._by_id[schema_id]
        result = self._request("GET", f"/schemas/ids/{schema_id}")
        if result is None:
            return None
        parsed = fastavro.parse_schema(json.loads(result["schema"]))
        with self._lock:
            self._by_id[schema_id] = parsed
        return parsed

    def check_compatibility(self, subject: str, schema_json: str) -> bool:
        """Is the schema compatible with the latest version under the subject (the subject's rule)?"""
        result = self._request(
            "POST", f"/compatibility/subjects/{subject}/versions/latest",
            json={"schema": schema_json, "schemaType": "AVRO"},
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        return True if result is None else bool(result.get("is_compatible"))


@dataclass(frozen=True)
class DecodedRecord:
    schema_id: int
    schema_name: str
    record: dict[str, Any]


class AvroSerde:
    """Encode and decode records of the project's schemas in the Confluent wire format."""

    def __init__(self, registry: SchemaRegistryClient):
        self.registry = registry
        # schema id -> (parsed writer schema, its compiled decoder or None): decode_raw's per-record path
        self._compiled: dict[int, tuple[Any, Decoder | None]] = {}

    def encode(self, subject: str, schema_name: str, record: dict[str, Any]) -> bytes:
        schema_id = self.registry.register(subject, schema_text(schema_name))
        return encode_with_id(schema_id, load_schema(schema_name), record)

    def _writer_schema(self, schema_id: int) -> Any:
        schema = self.registry.schema_by_id(schema_id)
        if schema is None:
            raise SerdeError("UNKNOWN_SCHEMA", f"schema id {schema_id} is not in the registry")
        return schema

    def decode(self, data: bytes | None) -> DecodedRecord:
        schema_id, body = split_header(data)
        schema = self._writer_schema(schema_id)
        return DecodedRecord(schema_id, schema.get("name", ""), decode_body(schema, body))

    def decode_raw(self, data: bytes | None) -> DecodedRecord:
        """decode() through a decoder compiled once per writer schema (streams.avro_decoder, several times cheaper
        per small record): logical types stay in their underlying type (timestamp-millis as epoch ms). A body it
        cannot read goes to fastavro, so the SerdeError names the problem exactly as decode() does."""
        schema_id, body = split_header(data)
        found = self._compiled.get(schema_id)
        if found is None:
            schema = self._writer_schema(schema_id)
            found = self._compiled[schema_id] = (schema, compile_decoder(schema))
        schema, decoder = found
        if decoder is not None:
            try:
                return DecodedRecord(schema_id, schema.get("name", ""), decoder(body, 0))
            except DecodeFailed:
                pass
        return DecodedRecord(schema_id, schema.get("name", ""), decode_body(schema, body))


def encode_with_id(schema_id: int, parsed_schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(HEADER.pack(MAGIC, schema_id))
    fastavro.schemaless_writer(buffer, parsed_schema, record)
    return buffer.getvalue()


def split_header(data: bytes | None) -> tuple[int, bytes]:
    """(schema id, Avro body) of a wire-format record, or SerdeError."""
    if data is None:
        raise SerdeError("BAD_MAGIC", "record has no value (null)")
    if len(data) > MAX_RECORD_BYTES:
        raise SerdeError("OVERSIZED", f"record is {len(data)} bytes, limit {MAX_RECORD_BYTES}")
    if len(data) < HEADER.size:
        raise SerdeError("BAD_MAGIC", f"record is {len(data)} bytes, shorter than the 5-byte header")
    magic, schema_id = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SerdeError("BAD_MAGIC", f"magic byte is {magic}, expected 0 (Confluent wire format)")
    return schema_id, bytes(data[HEADER.size :])


def decode_body(parsed_schema: Any, body: bytes) -> dict[str, Any]:
    buffer = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buffer, parsed_schema)
    except Exception as exc:  # fastavro raises many types on corrupt input (EOFError, ValueError, ...)
        raise SerdeError("DECODE_ERROR", f"Avro body does not match the schema: {exc.__class__.__name__}: {exc}") from exc
    if buffer.tell() != len(body):
        raise SerdeError("DECODE_ERROR", f"{len(body) - buffer.tell()} trailing bytes after the Avro record")
    return record
