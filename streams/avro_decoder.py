"""A schema-compiled Avro decoder: the reader side of streams/avro_codegen.py, ~4x cheaper per small record.

The tokenize job decodes every event once, and fastavro's per-call set-up (reader state, schema walk) costs
more than the few fields of a UserEvent. For each writer schema we generate one straight-line Python
function once. It returns the same dict as ``fastavro.schemaless_reader`` except that logical types stay
in their underlying type (timestamp-millis stays an int of epoch ms, which is what the tokenizer wants).
Any failure (truncated or corrupt body, out-of-range enum or union index, bad UTF-8, trailing bytes)
raises :class:`DecodeFailed`; callers then ask fastavro, which names the error (streams.serde.decode_body).
tests/streams/test_avro_decoder.py checks equality with fastavro on every project schema and on corrupt input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

Decoder = Callable[[bytes, int], dict[str, Any]]
_FLOAT = struct.Struct("<f").unpack_from
_DOUBLE = struct.Struct("<d").unpack_from


class DecodeFailed(ValueError):
    """The body does not decode with this schema (or uses something the generator does not compile)."""


class Unsupported(Exception):
    """The schema uses a construct left to fastavro."""


def read_long(b: bytes, p: int) -> tuple[int, int]:
    """Zig-zag varint at p -> (value, next position)."""
    x = b[p]
    p += 1
    n = x & 0x7F
    shift = 7
    while x & 0x80:
        if shift > 63:
            raise DecodeFailed("varint longer than 10 bytes")
        x = b[p]
        p += 1
        n |= (x & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), p


class _Gen:
    def __init__(self, named: dict[str, Any]):
        self.named = named
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.n = 0

    def var(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: Any) -> str:
        name = self.var("C")
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def length(self, target: str, indent: int) -> None:
        """A non-negative length (one byte inline, the common case)."""
        self.emit(indent, "x = b[p]")
        self.emit(indent, "if x < 0x80:")
        self.emit(indent + 1, f"{target} = x >> 1; p += 1")
        self.emit(indent + 1, "if x & 1: raise DF('negative length')")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"{target}, p = rl(b, p)")
        self.emit(indent + 1, f"if {target} < 0: raise DF('negative length')")

    def value(self, t: Any, target: str, indent: int) -> None:
        """Emit code that decodes one value of Avro type t at b[p] into `target`, advancing p."""
        if isinstance(t, str) and t in self.named:
            t = self.named[t]
        if isinstance(t, list):
            self.union(t, target, indent)
            return
        name = t if isinstance(t, str) else t["type"]
        if isinstance(name, (dict, list)):
            self.value(name, target, indent)
            return
        if name == "null":
            self.emit(indent, f"{target} = None")
        elif name in ("string", "bytes"):
            n = self.var("n")
            self.length(n, indent)
            self.emit(indent, f"e = p + {n}")
            self.emit(indent, "if e > L: raise DF('truncated')")
            tail = ".decode()" if name == "string" else ""
            self.emit(indent, f"{target} = b[p:e]{tail}; p = e")
        elif name in ("int", "long"):
            self.emit(indent, "x = b[p]")
            self.emit(indent, "if x < 0x80:")
            self.emit(indent + 1, f"{target} = (x >> 1) ^ -(x & 1); p += 1")
            self.emit(indent, "else:")
            self.emit(indent + 1, f"{target}, p = rl(b, p)")
            if name == "int":
                self.emit(indent + 1, f"if not -2147483648 <= {target} < 2147483648: raise DF('int out of range')")
        elif name == "float":
            self.emit(indent, f"{target} = FLOAT(b, p)[0]; p += 4")
        elif name == "double":
            self.emit(indent, f"{target} = DOUBLE(b, p)[0]; p += 8")
        elif name == "boolean":
            self.emit(indent, "x = b[p]; p += 1")
            self.emit(indent, "if x > 1: raise DF('bad boolean')")
            self.emit(indent, f"{target} = x == 1")
        elif name == "enum":
            symbols = self.const(tuple(t["symbols"]))
            i = self.var("i")
            self.value("int", i, indent)
            self.emit(indent, f"if {i} < 0: raise DF('bad enum index')")
            self.emit(indent, f"{target} = {symbols}[{i}]")
        elif name == "fixed":
            self.emit(indent, f"e = p + {int(t['size'])}")
            self.emit(indent, "if e > L: raise DF('truncated')")
            self.emit(indent, f"{target} = b[p:e]; p = e")
        elif name == "record":
            self.record(t, target, indent)
        elif name in ("array", "map"):
            self.container(t, name, target, indent)
        else:
            raise Unsupported(f"type {name}")

    def container(self, t: dict[str, Any], name: str, target: str, indent: int) -> None:
        count, item = self.var("c"), self.var("i")
        self.emit(indent, f"{target} = {{}}" if name == "map" else f"{target} = []")
        self.emit(indent, "while True:")
        self.value("long", count, indent + 1)  # a block count: one byte inline, as the other varints
        self.emit(indent + 1, f"if {count} == 0: break")
        self.emit(indent + 1, f"if {count} < 0:")
        self.emit(indent + 2, f"{count} = -{count}; _size, p = rl(b, p)")
        self.emit(indent + 1, f"if {count} > L: raise DF('block count beyond the record')")
        self.emit(indent + 1, f"for _ in range({count}):")
        if name == "map":
            key = self.var("k")
            self.value("string", key, indent + 2)
            self.value(t["values"], item, indent + 2)
            self.emit(indent + 2, f"{target}[{key}] = {item}")
        else:
            self.value(t["items"], item, indent + 2)
            self.emit(indent + 2, f"{target}.append({item})")

    def union(self, branches: list[Any], target: str, indent: int) -> None:
        i = self.var("u")
        self.value("long", i, indent)
        for k, branch in enumerate(branches):
            self.emit(indent, f"{'if' if k == 0 else 'elif'} {i} == {k}:")
            self.value(branch, target, indent + 1)
        self.emit(indent, "else:")
        self.emit(indent + 1, "raise DF('bad union index')")

    def record(self, t: dict[str, Any], target: str, indent: int) -> None:
        values = []
        for field in t["fields"]:
            v = self.var()
            self.value(field["type"], v, indent)
            values.append(f"{field['name']!r}: {v}")
        self.emit(indent, f"{target} = {{{', '.join(values)}}}")


def _function(gen: _Gen, name: str) -> Decoder:
    """The generated lines as decode(buffer, start); failures other than DecodeFailed become DecodeFailed."""
    source = "def dec(b, p):\n" + "\n".join(gen.lines) + "\n"
    namespace: dict[str, Any] = {"rl": read_long, "DF": DecodeFailed, "FLOAT": _FLOAT, "DOUBLE": _DOUBLE,
                                 **gen.consts}
    exec(compile(source, f"<avro decoder {name}>", "exec"), namespace)  # noqa: S102
    raw = namespace["dec"]

    def decode(buffer: bytes, start: int = 0) -> dict[str, Any]:
        try:
            return raw(buffer, start)
        except DecodeFailed:
            raise
        except (IndexError, UnicodeDecodeError, struct.error, TypeError) as exc:  # ran off the end, bad text
            raise DecodeFailed(f"{exc.__class__.__name__}: {exc}") from exc

    decode.source = source  # type: ignore[attr-defined]
    return decode


def compile_decoder(parsed_schema: dict[str, Any]) -> Decoder | None:
    """decode(buffer, start) -> record for this (fastavro-parsed) writer schema; None if not compilable."""
    gen = _Gen(parsed_schema.get("__named_schemas", {}))
    try:
        gen.emit(1, "L = len(b)")
        gen.record(parsed_schema, "out", 1)
        gen.emit(1, "if p != L: raise DF(f'{L - p} trailing bytes')")
        gen.emit(1, "return out")
    except Unsupported:
        return None
    return _function(gen, str(parsed_schema.get("name")))


REQUIRED = object()  # compile_projection: a field without a default (the writer must have it)


def compile_projection(parsed_schema: dict[str, Any], fields: dict[str, Any],
                       as_tuple: frozenset[str] = frozenset()) -> Decoder | None:
    """decode(buffer, start) -> {name: value} over exactly the names of `fields`: a reader's view of one writer
    schema, without the whole record's dict (jobs/token_batch.py). Writer fields not in `fields` are read and
    dropped; names the writer lacks take their value in `fields` (REQUIRED there: not compilable, None); names in
    `as_tuple` become tuples. Fails exactly where :func:`compile_decoder` fails (DecodeFailed)."""
    gen = _Gen(parsed_schema.get("__named_schemas", {}))
    written: dict[str, str] = {}
    try:
        gen.emit(1, "L = len(b)")
        for field in parsed_schema["fields"]:
            target = gen.var()
            gen.value(field["type"], target, 1)
            written[field["name"]] = target
    except Unsupported:
        return None
    values = []
    for name, default in fields.items():
        if name in written:
            value = f"tuple({written[name]})" if name in as_tuple else written[name]
        elif default is REQUIRED:
            return None
        else:
            value = gen.const(tuple(default) if name in as_tuple else default)
        values.append(f"{name!r}: {value}")
    gen.emit(1, "if p != L: raise DF(f'{L - p} trailing bytes')")
    gen.emit(1, f"return {{{', '.join(values)}}}")
    return _function(gen, f"{parsed_schema.get('name')} projection")
