"""The compiled Avro decoder reads exactly what fastavro reads, and fails (never guesses) on corrupt bodies."""

from __future__ import annotations

import io
import json
import random
import sys
from datetime import datetime
from pathlib import Path

import fastavro
import pytest

from streams.avro_decoder import DecodeFailed, compile_decoder, read_long
from streams.serde import SCHEMA_DIR, load_schema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_schema_compat import samples  # noqa: E402  (the schema samples that visit every branch)

NAMES = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))


def plain(value):
    """fastavro turns timestamp-millis into datetimes; the compiled decoder keeps epoch ms."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def encode(parsed, record) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, record)
    return buffer.getvalue()


@pytest.mark.parametrize("name", NAMES)
def test_same_records_as_fastavro(name: str):
    parsed = load_schema(name)
    decode = compile_decoder(parsed)
    assert decode is not None
    for record in samples(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())):
        body = encode(parsed, record)
        expected = plain(fastavro.schemaless_reader(io.BytesIO(body), parsed))
        assert decode(b"\x00\x00\x00\x00\x01" + body, 5) == expected


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_bodies_fail_or_agree_with_fastavro(name: str):
    parsed = load_schema(name)
    decode = compile_decoder(parsed)
    rng = random.Random(7)
    for record in samples(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())):
        body = encode(parsed, record)
        variants = [body[:cut] for cut in range(len(body))] + [body + b"\x00"]
        for _ in range(30):
            flipped = bytearray(body)
            flipped[rng.randrange(len(body))] = rng.randrange(256)
            variants.append(bytes(flipped))
        for data in variants:
            try:
                got = decode(data, 0)
            except DecodeFailed:
                continue  # the caller asks fastavro for the error; nothing was guessed
            buffer = io.BytesIO(data)
            want = plain(fastavro.schemaless_reader(buffer, parsed))
            assert buffer.tell() == len(data) and got == want


def test_varints():
    for n in (0, 1, -1, 63, -64, 64, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)):
        data = encode(fastavro.parse_schema("long"), n)
        assert read_long(data, 0) == (n, len(data))
    with pytest.raises(DecodeFailed):
        read_long(b"\xff" * 11, 0)
