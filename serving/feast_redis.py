"""Feast's Redis layout, read without the Feast SDK: entity keys, field names and stored protobuf values.

Feast 0.67's Redis online store keeps one hash per entity: the key is the serialized entity key
(entity_key_serialization_version 3) followed by the project name; each feature is a field named by the
murmur3 hash of ``"<view>:<feature>"`` holding a serialized ``feast.types.Value``, and ``_ts:<view>`` holds
the event timestamp. Reading that hash with one HMGET skips the SDK's per-call overhead (see
bench/state_fetch.py). The value decoder is built from a minimal copy of Feast's ``Value`` descriptor with
the same field numbers, parsed by the protobuf runtime; values of other types are refused, not guessed.
tests/integration/test_serving.py checks this reader against the Feast SDK on real pushed rows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmh3
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_STRING_TYPE = 2  # feast ValueType.STRING, as written into serialized entity keys
TS_FIELD_PREFIX = "_ts:"


class UnsupportedValue(ValueError):
    """A stored Feast value of a type this decoder does not handle (so it is never mis-read)."""


@dataclass(frozen=True)
class FeastRedisLayout:
    """What decides the Redis key names: the Feast project and the key serialization version."""

    project: str
    entity_key_serialization_version: int = 3

    @classmethod
    def from_repo(cls, repo: Path) -> FeastRedisLayout:
        """Read ``feature_store.yaml`` and refuse layouts this reader does not implement."""
        config = yaml.safe_load((Path(repo) / "feature_store.yaml").read_text()) or {}
        version = int(config.get("entity_key_serialization_version", 3))
        if version != 3:
            raise ValueError(
                f"direct Redis reads need entity_key_serialization_version 3, the repo has {version}"
            )
        registry = config.get("registry")
        if isinstance(registry, dict) and registry.get("enable_online_feature_view_versioning"):
            raise ValueError("direct Redis reads do not support enable_online_feature_view_versioning")
        online = config.get("online_store") or {}
        if online.get("type") != "redis" or online.get("redis_type", "redis") != "redis":
            raise ValueError(f"direct Redis reads need a plain `type: redis` online store, got {online}")
        return cls(project=str(config["project"]), entity_key_serialization_version=version)

    def entity_key(self, join_key: str, value: str) -> bytes:
        """Feast's serialize_entity_key (v3, one string join key) followed by the project name."""
        key = join_key.encode("utf-8")
        val = value.encode("utf-8")
        return b"".join(
            (
                struct.pack("<I", 1),
                struct.pack("<I", _STRING_TYPE),
                struct.pack("<I", len(key)),
                key,
                struct.pack("<I", _STRING_TYPE),
                struct.pack("<I", len(val)),
                val,
                self.project.encode("utf-8"),
            )
        )


def feature_field(view: str, feature: str) -> bytes:
    """The hash field of one feature: murmur3_32 of ``view:feature``, 4 bytes little endian (Feast's _mmh3)."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def _value_class():
    """A message class with the wire layout of feast.types.Value for the types UGT stores."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="ugt_feast_value.proto", package="ugt.feastwire", syntax="proto3"
    )
    f = descriptor_pb2.FieldDescriptorProto
    for list_name, item_type in (
        ("StringList", f.TYPE_STRING),
        ("Int64List", f.TYPE_INT64),
        ("Int32List", f.TYPE_INT32),
        ("DoubleList", f.TYPE_DOUBLE),
    ):
        message = fdp.message_type.add(name=list_name)
        message.field.add(name="val", number=1, type=item_type, label=f.LABEL_REPEATED)
    value = fdp.message_type.add(name="Value")
    value.oneof_decl.add(name="val")
    scalars = (
        ("string_val", 2, f.TYPE_STRING),
        ("int32_val", 3, f.TYPE_INT32),
        ("int64_val", 4, f.TYPE_INT64),
        ("double_val", 5, f.TYPE_DOUBLE),
        ("float_val", 6, f.TYPE_FLOAT),
        ("bool_val", 7, f.TYPE_BOOL),
        ("unix_timestamp_val", 8, f.TYPE_INT64),
        ("null_val", 19, f.TYPE_INT32),
    )
    for name, number, kind in scalars:
        value.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL, oneof_index=0)
    lists = (
        ("string_list_val", 12, "StringList"),
        ("int32_list_val", 13, "Int32List"),
        ("int64_list_val", 14, "Int64List"),
        ("double_list_val", 15, "DoubleList"),
    )
    for name, number, type_name in lists:
        value.field.add(
            name=name,
            number=number,
            type=f.TYPE_MESSAGE,
            label=f.LABEL_OPTIONAL,
            type_name=f".ugt.feastwire.{type_name}",
            oneof_index=0,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("ugt.feastwire.Value"))


_Value = _value_class()


def decode_value(data: bytes | None) -> Any:
    """A stored feast Value -> Python (str, int, float, bool, list) or None when absent / null."""
    if not data:
        return None  # no field, or Feast's empty ValueProto (a missing feature)
    message = _Value()
    message.ParseFromString(data)
    which = message.WhichOneof("val")
    if which is None:
        raise UnsupportedValue(f"stored Feast value uses a type this reader does not decode: {data[:16]!r}")
    if which == "null_val":
        return None
    value = getattr(message, which)
    if which.endswith("_list_val"):
        return list(value.val)
    return value


def decode_typed(data: bytes | None, kind: str) -> Any:
    """Like :func:`decode_value`, but the value must be stored as ``kind`` (e.g. "int64_list_val");
    lists come back as tuples straight from the protobuf container (no per-element Python conversion)."""
    if not data:
        return None
    message = _Value()
    message.ParseFromString(data)
    which = message.WhichOneof("val")
    if which == kind:
        value = getattr(message, which)
        return tuple(value.val) if which.endswith("_list_val") else value
    if which == "null_val":
        return None
    raise UnsupportedValue(f"stored as {which or 'an unknown type'}, expected {kind}")
