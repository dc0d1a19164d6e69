"""Feast's Redis layout, read without the Feast SDK: the stored protobuf values of Feast's hashes.

The key layout (entity keys, feature field names) is UGT's Feast online store's (infra.feast_store); this
module decodes what those fields hold. Reading a user's hash
with one HMGET skips the SDK's per-call overhead and its import (see bench/state_fetch.py and docs/FEAST.md).
The value decoder is built from a minimal copy of Feast's ``Value`` descriptor with the same field
numbers, parsed by the protobuf runtime; values of other types are refused, not guessed.
tests/integration/test_feast_paths.py checks this reader against what Feast itself writes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


class UnsupportedValue(ValueError):
    """A stored Feast value of a type this decoder does not handle (so it is never mis-read)."""


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
_StringList = message_factory.GetMessageClass(_Value.DESCRIPTOR.fields_by_name["string_list_val"].message_type)
_Int64List = message_factory.GetMessageClass(_Value.DESCRIPTOR.fields_by_name["int64_list_val"].message_type)


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


# The first byte of a stored Value whose oneof holds these kinds: (field number << 3) | wire type.
_INT64_TAG = (4 << 3) | 0  # int64_val: a varint
_INT64_LIST_TAG = (14 << 3) | 2  # int64_list_val: a length-delimited Int64List
_PACKED_TAG = (1 << 3) | 2  # Int64List.val, packed (proto3's default): a length-delimited run of varints
_STRING_LIST_TAG = (12 << 3) | 2  # string_list_val: a length-delimited StringList (its values: tag 1 entries)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it; (-1, pos) when it runs past the end."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def _fast_int64(data: bytes) -> int | None:
    """An int64_val read straight from its bytes, or None when they are anything else (upb decides then)."""
    if data[0] != _INT64_TAG:
        return None
    value, end = _varint(data, 1)
    if value < 0 or end != len(data):
        return None
    return value - (1 << 64) if value >= 1 << 63 else value


def _fast_small_int64s(data: bytes) -> tuple[int, ...] | None:
    """An int64_list_val of values 0..127 read straight from its bytes (each value one varint byte, so the packed
    run is the values), or None for any other layout or value (upb decides then). Action and rating tokens are such
    lists, and this skips the protobuf container's per-element conversion."""
    if data[0] != _INT64_LIST_TAG:
        return None
    size, pos = _varint(data, 1)
    if size != len(data) - pos:
        return None
    if size == 0:
        return ()
    if data[pos] != _PACKED_TAG:
        return None
    run, start = _varint(data, pos + 1)
    if run != len(data) - start:
        return None
    values = data[start:]
    return tuple(values) if values.isascii() else None


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def list_values_at(data: bytes, kind: str) -> int | None:
    """Where the values of a stored non-empty string list or packed int64 list start (past the Value's header and,
    for an int64 list, the packed run's), or None for any other kind or layout."""
    tag = {"string_list_val": _STRING_LIST_TAG, "int64_list_val": _INT64_LIST_TAG}.get(kind)
    if tag is None or not data or data[0] != tag:
        return None
    size, pos = _varint(data, 1)
    if size <= 0 or size != len(data) - pos:
        return None
    if kind == "string_list_val":
        return pos
    if data[pos] != _PACKED_TAG:
        return None
    run, start = _varint(data, pos + 1)
    return start if run == len(data) - start else None


def decode_appended(old: bytes, old_values: tuple, new: bytes, kind: str) -> tuple | None:
    """The values of ``new`` when it stores the list ``old`` stores (whose values are ``old_values``) followed by
    more: ``old_values`` plus the new ones, only those decoded (a state that gained events: its lists' stored runs
    grow at the end). None when ``new`` is anything else: the caller decodes it whole. The same tuple
    :func:`decode_typed` gives (tests/serving/test_serving_feast_redis.py)."""
    a, b = list_values_at(old, kind), list_values_at(new, kind)
    if a is None or b is None:
        return None
    kept = len(old) - a
    if len(new) - b <= kept or not new.startswith(old[a:], b):
        return None
    tail = new[b + kept :]  # whole values: the old run ends where a value ends, and so the new run's next one starts
    if kind == "string_list_val":
        return old_values + tuple(_StringList.FromString(tail).val)
    if tail.isascii():  # every value one varint byte: the bytes are the values (as _fast_small_int64s reads them)
        return old_values + tuple(tail)
    return old_values + tuple(_Int64List.FromString(bytes((_PACKED_TAG,)) + _varint_bytes(len(tail)) + tail).val)


def decode_typed(data: bytes | None, kind: str) -> Any:
    """Like :func:`decode_value`, but the value must be stored as ``kind`` (e.g. "int64_list_val");
    lists come back as tuples straight from the protobuf container (no per-element Python conversion).
    int64 scalars and lists of small int64s are read from their bytes without protobuf (the same values:
    tests/serving/test_serving_feast_redis.py compares both ways)."""
    if not data:
        return None
    if kind == "int64_val":
        fast = _fast_int64(data)
        if fast is not None:
            return fast
    elif kind == "int64_list_val":
        fast_list = _fast_small_int64s(data)
        if fast_list is not None:
            return fast_list
    message = _Value()
    message.ParseFromString(data)
    which = message.WhichOneof("val")
    if which == kind:
        value = getattr(message, which)
        return tuple(value.val) if which.endswith("_list_val") else value
    if which == "null_val":
        return None
    raise UnsupportedValue(f"stored as {which or 'an unknown type'}, expected {kind}")


def encode_typed(value: Any, kind: str) -> bytes:
    """The stored bytes of ``value`` as a feast Value of ``kind`` (e.g. "int64_list_val"); None -> Feast's empty
    Value. The inverse of :func:`decode_typed`, byte for byte what Feast's own writer stores
    (tests/test_feast_online_store.py compares them)."""
    message = _Value()
    if value is None:
        return message.SerializeToString()
    if kind.endswith("_list_val"):
        getattr(message, kind).val.extend(value)
    else:
        setattr(message, kind, value)
    return message.SerializeToString()
