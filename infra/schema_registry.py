"""A small, real, Confluent-compatible Schema Registry for the local stack (Avro only).

Why it exists: no Confluent-compatible registry can be started from the registries this project
reaches (docs/STACK.md says exactly why). This one speaks the Confluent REST API that
`confluent_kafka.schema_registry.SchemaRegistryClient` and Flink's `avro-confluent` format use,
under the same base path Apicurio serves it (`/apis/ccompat/v7`, requests without the prefix work
too), enforces compatibility levels with the Avro resolution rules (the `avro` library's
ReaderWriterCompatibilityChecker) and persists every schema to one JSON file, so ids are stable
across restarts.

Run: `python -m infra.schema_registry --port 8085 --data var/registry/registry.json`
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import avro.errors
import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

PREFIX = "/apis/ccompat/v7"
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# Confluent's compatibility levels: BACKWARD = the new schema reads data written with the old one, FORWARD = the
# old reads the new, FULL = both; *_TRANSITIVE checks against every earlier version instead of only the latest
LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
log = logging.getLogger("ugt.registry")


class InvalidSchema(ValueError):
    """The text is not a valid Avro schema (bad JSON, or rejected by the avro library's parser)."""


class ParsedSchema:
    """A schema's text as registered plus the avro library's parsed form (what compatibility is checked on)."""

    def __init__(self, text: str) -> None:
        try:
            self.schema = avro.schema.parse(text)
        except (avro.errors.AvroException, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidSchema(f"invalid Avro schema: {exc}") from exc
        self.text = text

    def canonical(self) -> str:
        """A stable string for 'is this the same schema' (key order and whitespace do not matter)."""
        return json.dumps(json.loads(self.text), sort_keys=True, separators=(",", ":"))


def read_errors(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why `reader` cannot read what `writer` wrote (Avro schema resolution); an empty list means it can.

    The library reports one result per pair: the kinds of incompatibility, their messages (a field name for a
    missing default, the missing symbols of an enum, ...) and where in the reader they are.
    """
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader.schema, writer.schema)
    if result.compatibility is not SchemaCompatibilityType.incompatible:
        return []
    kinds = ", ".join(sorted({kind.value for kind in result.incompatibilities}))
    where = sorted(result.locations - {"/"}) or ["/"]  # the library's merge keeps the root beside the real place
    return [f"{kinds}: {'; '.join(sorted(result.messages))} (at {', '.join(where)})"]


def compatibility_errors(new: ParsedSchema, existing: list[ParsedSchema], level: str) -> list[str]:
    """Check `new` against the subject's versions (oldest first) under a Confluent compatibility level."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "NONE" or not existing:
        return []
    against = existing if level.endswith("_TRANSITIVE") else existing[-1:]
    errors: list[str] = []
    for old in against:
        if level.startswith(("BACKWARD", "FULL")):
            errors += [f"BACKWARD: {e}" for e in read_errors(new, old)]
        if level.startswith(("FORWARD", "FULL")):
            errors += [f"FORWARD: {e}" for e in read_errors(old, new)]
    return errors


class RegistryError(Exception):
    """An error the Confluent API reports as {"error_code": ..., "message": ...}."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def _not_found_subject(subject: str) -> RegistryError:
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


@dataclass
class _Version:
    version: int
    schema_id: int


class SchemaStore:
    """Subjects, versions and global schema ids, persisted to one JSON file after every write."""

    def __init__(self, path: Path, default_level: str = "BACKWARD") -> None:
        self.path = path
        self.lock = threading.RLock()
        self.schemas: dict[int, str] = {}  # id -> schema text as first registered
        self.by_canonical: dict[str, int] = {}
        self.subjects: dict[str, list[_Version]] = {}
        self.config: dict[str, str] = {"": default_level}  # "" = global level
        self._parsed: dict[int, ParsedSchema] = {}
        if path.exists():
            self._load()

    # persistence -----------------------------------------------------------------------------
    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        self.schemas = {int(k): v for k, v in data["schemas"].items()}
        self.subjects = {s: [_Version(v["version"], v["id"]) for v in vs] for s, vs in data["subjects"].items()}
        self.config = data.get("config", self.config)
        for schema_id, text in self.schemas.items():
            self.by_canonical[self._parse(schema_id, text).canonical()] = schema_id

    def _save(self) -> None:
        data = {
            "schemas": {str(k): v for k, v in self.schemas.items()},
            "subjects": {s: [{"version": v.version, "id": v.schema_id} for v in vs] for s, vs in self.subjects.items()},
            "config": self.config,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file

    def _parse(self, schema_id: int, text: str) -> ParsedSchema:
        if schema_id not in self._parsed:
            self._parsed[schema_id] = ParsedSchema(text)
        return self._parsed[schema_id]

    # queries -----------------------------------------------------------------------------------
    def level(self, subject: str | None) -> str:
        return self.config.get(subject or "", self.config[""])

    def versions(self, subject: str) -> list[_Version]:
        if subject not in self.subjects or not self.subjects[subject]:
            raise _not_found_subject(subject)
        return self.subjects[subject]

    def version(self, subject: str, version: str) -> _Version:
        versions = self.versions(subject)
        if version in ("latest", "-1"):
            return versions[-1]
        try:
            number = int(version)
        except ValueError as exc:
            raise RegistryError(422, 42202, f"The specified version '{version}' is not a valid version id.") from exc
        for v in versions:
            if v.version == number:
                return v
        raise RegistryError(404, 40402, f"Version {version} not found.")

    def schema(self, schema_id: int) -> str:
        if schema_id not in self.schemas:
            raise RegistryError(404, 40403, f"Schema {schema_id} not found")
        return self.schemas[schema_id]

    def subject_version(self, subject: str, v: _Version) -> dict[str, Any]:
        return {"subject": subject, "version": v.version, "id": v.schema_id, "schema": self.schemas[v.schema_id]}

    def lookup(self, subject: str, parsed: ParsedSchema) -> dict[str, Any]:
        schema_id = self.by_canonical.get(parsed.canonical())
        for v in self.versions(subject):
            if v.schema_id == schema_id:
                return self.subject_version(subject, v)
        raise RegistryError(404, 40403, "Schema not found")

    def compatibility(self, subject: str, parsed: ParsedSchema, version: str | None) -> list[str]:
        """Errors of `parsed` against the subject under its level (one version, or the level's set)."""
        level = self.level(subject)
        if version is None:
            existing = [self._parse(v.schema_id, self.schemas[v.schema_id]) for v in self.subjects.get(subject, [])]
            return compatibility_errors(parsed, existing, level)
        v = self.version(subject, version)
        old = self._parse(v.schema_id, self.schemas[v.schema_id])
        return compatibility_errors(parsed, [old], level.replace("_TRANSITIVE", ""))

    # writes ------------------------------------------------------------------------------------
    def register(self, subject: str, parsed: ParsedSchema) -> int:
        """Register under `subject`; the same schema again returns its existing id (idempotent)."""
        with self.lock:
            canonical = parsed.canonical()
            schema_id = self.by_canonical.get(canonical)
            versions = self.subjects.setdefault(subject, [])
            if schema_id is not None and any(v.schema_id == schema_id for v in versions):
                return schema_id
            errors = self.compatibility(subject, parsed, None)
            if errors:
                raise RegistryError(
                    409,
                    409,
                    f"Schema being registered is incompatible with an earlier schema for subject '{subject}' "
                    f"(level {self.level(subject)}): " + "; ".join(errors),
                )
            if schema_id is None:
                schema_id = max(self.schemas, default=0) + 1
                self.schemas[schema_id] = parsed.text
                self.by_canonical[canonical] = schema_id
                self._parsed[schema_id] = parsed
            versions.append(_Version(max((v.version for v in versions), default=0) + 1, schema_id))
            self._save()
            log.info("registered subject=%s version=%d id=%d", subject, versions[-1].version, schema_id)
            return schema_id

    def delete_subject(self, subject: str) -> list[int]:
        with self.lock:
            versions = self.versions(subject)
            del self.subjects[subject]
            self.config.pop(subject, None)
            self._save()
            return [v.version for v in versions]

    def delete_version(self, subject: str, version: str) -> int:
        with self.lock:
            v = self.version(subject, version)
            self.subjects[subject].remove(v)
            if not self.subjects[subject]:
                del self.subjects[subject]
            self._save()
            return v.version

    def set_level(self, subject: str | None, level: str) -> str:
        level = level.upper()
        if level not in LEVELS:
            raise RegistryError(422, 42203, f"Invalid compatibility level {level!r}; one of {', '.join(LEVELS)}")
        with self.lock:
            self.config[subject or ""] = level
            self._save()
        return level


def _parse_body(body: dict[str, Any]) -> ParsedSchema:
    schema_type = body.get("schemaType", "AVRO")
    if schema_type != "AVRO":
        raise RegistryError(422, 42201, f"schemaType {schema_type!r} is not supported here: AVRO only")
    if body.get("references"):
        raise RegistryError(422, 42201, "schema references are not supported: register self-contained schemas")
    if not isinstance(body.get("schema"), str):
        raise RegistryError(422, 42201, "request body needs a 'schema' string")
    try:
        return ParsedSchema(body["schema"])
    except InvalidSchema as exc:
        raise RegistryError(422, 42201, f"Invalid schema: {exc}") from exc


class RegistryApp:
    """Routes (method, path) to the store; returns (status, json-able body)."""

    def __init__(self, store: SchemaStore) -> None:
        self.store = store
        s = r"(?P<subject>[^/]+)"
        v = r"(?P<version>[^/]+)"
        self.routes: list[tuple[str, re.Pattern[str], Any]] = [
            ("GET", r"", lambda m, q, b: {}),
            ("GET", r"/subjects", self.list_subjects),
            ("GET", r"/schemas/types", lambda m, q, b: ["AVRO"]),
            ("GET", r"/schemas/ids/(?P<id>\d+)", self.get_schema),
            ("GET", r"/schemas/ids/(?P<id>\d+)/schema", lambda m, q, b: json.loads(self.store.schema(int(m["id"])))),
            ("GET", r"/schemas/ids/(?P<id>\d+)/subjects", self.schema_subjects),
            ("GET", r"/schemas/ids/(?P<id>\d+)/versions", self.schema_versions),
            ("GET", rf"/subjects/{s}/versions", lambda m, q, b: [x.version for x in self.store.versions(m["subject"])]),
            ("POST", rf"/subjects/{s}/versions", self.register),
            ("POST", rf"/subjects/{s}", self.lookup),
            ("DELETE", rf"/subjects/{s}", lambda m, q, b: self.store.delete_subject(m["subject"])),
            ("GET", rf"/subjects/{s}/versions/{v}", self.get_version),
            ("GET", rf"/subjects/{s}/versions/{v}/schema", self.get_version_schema),
            ("DELETE", rf"/subjects/{s}/versions/{v}", lambda m, q, b: self.store.delete_version(m["subject"], m["version"])),
            ("POST", rf"/compatibility/subjects/{s}/versions/{v}", self.compatibility),
            ("POST", rf"/compatibility/subjects/{s}/versions", self.compatibility),
            ("GET", r"/config", lambda m, q, b: {"compatibilityLevel": self.store.level(None)}),
            ("PUT", r"/config", self.put_config),
            ("GET", rf"/config/{s}", lambda m, q, b: {"compatibilityLevel": self.store.level(m["subject"])}),
            ("PUT", rf"/config/{s}", self.put_config),
            ("GET", r"/mode", lambda m, q, b: {"mode": "READWRITE"}),
            ("GET", rf"/mode/{s}", lambda m, q, b: {"mode": "READWRITE"}),
        ]
        self.routes = [(meth, re.compile(pat + r"/?$"), fn) for meth, pat, fn in self.routes]

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, Any]:
        parts = urlsplit(raw_path)
        path = parts.path
        if path.startswith(PREFIX):
            path = path[len(PREFIX) :]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        allowed = False
        for meth, pattern, fn in self.routes:
            match = pattern.match(path)
            if not match:
                continue
            allowed = True
            if meth != method:
                continue
            groups = {k: unquote(x) for k, x in match.groupdict().items()}
            payload: dict[str, Any] = {}
            if body:
                try:
                    payload = json.loads(body)
                except json.JSONDecodeError as exc:
                    raise RegistryError(400, 400, f"request body is not JSON: {exc}") from exc
                if not isinstance(payload, dict):
                    raise RegistryError(400, 400, "request body must be a JSON object")
            with self.store.lock:
                return 200, fn(groups, query, payload)
        if allowed:
            raise RegistryError(405, 405, f"method {method} not allowed on {path}")
        raise RegistryError(404, 404, f"no such endpoint: {path}")

    def list_subjects(self, m: dict, q: dict, b: dict) -> list[str]:
        return sorted(s for s, vs in self.store.subjects.items() if vs)

    def get_schema(self, m: dict, q: dict, b: dict) -> dict[str, Any]:
        return {"schema": self.store.schema(int(m["id"]))}

    def schema_subjects(self, m: dict, q: dict, b: dict) -> list[str]:
        schema_id = int(m["id"])
        self.store.schema(schema_id)
        return sorted(s for s, vs in self.store.subjects.items() if any(v.schema_id == schema_id for v in vs))

    def schema_versions(self, m: dict, q: dict, b: dict) -> list[dict[str, Any]]:
        schema_id = int(m["id"])
        self.store.schema(schema_id)
        return [
            {"subject": s, "version": v.version}
            for s, vs in sorted(self.store.subjects.items())
            for v in vs
            if v.schema_id == schema_id
        ]

    def register(self, m: dict, q: dict, b: dict) -> dict[str, Any]:
        return {"id": self.store.register(m["subject"], _parse_body(b))}

    def lookup(self, m: dict, q: dict, b: dict) -> dict[str, Any]:
        return self.store.lookup(m["subject"], _parse_body(b))

    def get_version(self, m: dict, q: dict, b: dict) -> dict[str, Any]:
        return self.store.subject_version(m["subject"], self.store.version(m["subject"], m["version"]))

    def get_version_schema(self, m: dict, q: dict, b: dict) -> Any:
        v = self.store.version(m["subject"], m["version"])
        return json.loads(self.store.schema(v.schema_id))

    def compatibility(self, m: dict, q: dict, b: dict) -> dict[str, Any]:
        parsed = _parse_body(b)
        subject = m["subject"]
        if m.get("version") is not None or subject in self.store.subjects:
            errors = self.store.compatibility(subject, parsed, m.get("version"))
        else:
            errors = []  # nothing registered yet: anything is compatible
        result: dict[str, Any] = {"is_compatible": not errors}
        if q.get("verbose", "false").lower() == "true":
            result["messages"] = errors
        return result

    def put_config(self, m: dict, q: dict, b: dict) -> dict[str, Any]:
        level = b.get("compatibility") or b.get("compatibilityLevel")
        if not isinstance(level, str):
            raise RegistryError(422, 42203, "body needs {'compatibility': '<LEVEL>'}")
        return {"compatibility": self.store.set_level(m.get("subject"), level)}


def _handler(app: RegistryApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, result = app.handle(self.command, self.path, body)
            except RegistryError as exc:
                status, result = exc.status, {"error_code": exc.error_code, "message": exc.message}
            except Exception as exc:  # a bug must answer 500, not drop the connection
                log.exception("request failed: %s %s", self.command, self.path)
                status, result = 500, {"error_code": 50001, "message": f"internal error: {exc}"}
            data = json.dumps(result).encode()
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(host: str, port: int, data: Path, level: str = "BACKWARD") -> ThreadingHTTPServer:
    """Build the HTTP server (not started); tests use it in-process on a free port."""
    server = ThreadingHTTPServer((host, port), _handler(RegistryApp(SchemaStore(data, level))))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    from infra.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=settings.registry_port)
    parser.add_argument("--data", type=Path, default=settings.var_dir / "registry" / "registry.json",
                        help="JSON file that holds every schema (created if missing)")
    parser.add_argument("--level", default="BACKWARD", choices=LEVELS, help="global compatibility level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server = make_server(args.host, args.port, args.data, args.level)
    log.info("schema registry on http://%s:%d%s (data %s)", args.host, args.port, PREFIX, args.data)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
