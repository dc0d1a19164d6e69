"""The model frames of ``engine_scope: model``: packed rows to the engine, top-k back, as raw arrays.

With ``engine_scope: model`` the `--workers N` workers run the whole pipeline (state reads, rows, reranking,
answers) and the engine only the model: a worker sends one frame per batch of its own, holding the batch's rows
already in the engine's packed layout (models/ugt/runner/batch.py) and its exclusions, as int32 arrays, with the
users' cache keys and prefix fingerprints; the engine answers with each row's top-k indices and scores. Nothing is
pickled or parsed per request: a frame is a small JSON head and numpy buffers, copied once into pinned memory.

Item indices of items the engine added while serving (live items, beyond the vocabulary the workers loaded) come
back with their ids: every one past the worker's vocabulary size (``known``), so a worker can name every item it is
given and hold them in the rows it builds. A frame of no rows only asks for those. With stream vectors (checkpoint
``embedding.stream_k`` > 0) a frame also carries the live-item events the worker found in its users' histories,
each as its user, its item and its prefix row (serving/live_stream.py); the engine counts them before the rows run.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

# head: JSON length; then the JSON head, the prints (16 bytes each), the rows and the exclusions (int32)
_LEN = struct.Struct("!I")
PRINT_BYTES = 16
INT32_MAX = np.iinfo(np.int32).max


class WireError(ValueError):
    """A model frame that does not hold what its head says (the peer is broken)."""


@dataclass(slots=True)
class ModelRows:
    """One worker batch for one served model (``route``): what ``UGTInference.recommend_packed`` takes."""

    route: str
    k: int
    keys: list[str | None]
    prints: list[bytes]
    vectors: np.ndarray  # (n, W) packed rows
    excl: np.ndarray  # (n, X) exclusions, 0-padded
    known: int = 0  # the worker's vocabulary size: the engine names every item index from here on
    stream_users: list[str] = field(default_factory=list)  # live-item events to count (serving/live_stream.py)
    stream_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (m,)
    stream_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # (m, W) prefix rows


@dataclass(slots=True)
class ModelTop:
    """The engine's answer to a :class:`ModelRows`: per row its top-k (best first), and the ids of live items."""

    counts: np.ndarray  # (n,) how many of each row's k are valid
    indices: np.ndarray  # (n, k)
    scores: np.ndarray  # (n, k)
    names: dict[int, str]  # index -> item id, for indices the worker's vocabulary does not have


def _int32(array: np.ndarray, what: str) -> bytes:
    if array.size and (array.min() < -INT32_MAX or array.max() > INT32_MAX):
        raise WireError(f"{what} hold values outside int32; the model frame cannot carry them")
    return np.ascontiguousarray(array, dtype=np.int32).tobytes()


def encode_rows(rows: ModelRows) -> bytes:
    n = len(rows.keys)
    if rows.vectors.shape[0] != n or rows.excl.shape[0] != n or len(rows.prints) != n:
        raise WireError(f"{n} keys but {rows.vectors.shape[0]} rows, {rows.excl.shape[0]} exclusion rows and "
                        f"{len(rows.prints)} prints")
    if any(len(p) != PRINT_BYTES for p in rows.prints):
        raise WireError(f"prefix fingerprints must be {PRINT_BYTES} bytes")
    m = len(rows.stream_users)
    if len(rows.stream_items) != m or (m and rows.stream_vectors.shape != (m, rows.vectors.shape[1])):
        raise WireError(f"{m} stream users but {len(rows.stream_items)} items and prefix rows of shape "
                        f"{rows.stream_vectors.shape}")
    head = orjson.dumps({"route": rows.route, "k": rows.k, "keys": rows.keys, "width": rows.vectors.shape[1],
                         "excl": rows.excl.shape[1], "known": rows.known, "stream_users": rows.stream_users})
    stream = (_int32(rows.stream_items, "stream items"), _int32(rows.stream_vectors, "prefix rows")) if m else ()
    return b"".join((_LEN.pack(len(head)), head, *rows.prints,
                     _int32(rows.vectors, "rows"), _int32(rows.excl, "exclusions"), *stream))


def decode_rows(payload: bytes) -> ModelRows:
    try:
        (size,) = _LEN.unpack_from(payload, 0)
        head = orjson.loads(payload[_LEN.size : _LEN.size + size])
        n, width, x = len(head["keys"]), int(head["width"]), int(head["excl"])
        at = _LEN.size + size
        prints = [payload[at + i * PRINT_BYTES : at + (i + 1) * PRINT_BYTES] for i in range(n)]
        at += n * PRINT_BYTES
        vectors = np.frombuffer(payload, dtype=np.int32, count=n * width, offset=at).reshape(n, width)
        at += 4 * n * width
        excl = np.frombuffer(payload, dtype=np.int32, count=n * x, offset=at).reshape(n, x)
        at += 4 * n * x
        users = [str(u) for u in head.get("stream_users", [])]
        m = len(users)
        items = np.frombuffer(payload, dtype=np.int32, count=m, offset=at)
        prefixes = np.frombuffer(payload, dtype=np.int32, count=m * width, offset=at + 4 * m).reshape(m, width)
        if at + 4 * m * (1 + width) != len(payload):
            raise WireError(f"model frame of {len(payload)} bytes, its head says {at + 4 * m * (1 + width)}")
        return ModelRows(str(head["route"]), int(head["k"]), list(head["keys"]), prints, vectors, excl,
                         int(head.get("known", 0)), users, items, prefixes)
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"unreadable model frame: {exc}") from exc


def encode_top(top: ModelTop) -> bytes:
    n, k = top.indices.shape
    head = orjson.dumps({"n": n, "k": k, "names": {str(i): name for i, name in top.names.items()}})
    return b"".join((_LEN.pack(len(head)), head, np.ascontiguousarray(top.counts, dtype=np.int32).tobytes(),
                     np.ascontiguousarray(top.indices, dtype=np.int32).tobytes(),
                     np.ascontiguousarray(top.scores, dtype=np.float32).tobytes()))


def decode_top(payload: bytes) -> ModelTop:
    try:
        (size,) = _LEN.unpack_from(payload, 0)
        head = orjson.loads(payload[_LEN.size : _LEN.size + size])
        n, k = int(head["n"]), int(head["k"])
        at = _LEN.size + size
        counts = np.frombuffer(payload, dtype=np.int32, count=n, offset=at)
        indices = np.frombuffer(payload, dtype=np.int32, count=n * k, offset=at + 4 * n).reshape(n, k)
        scores = np.frombuffer(payload, dtype=np.float32, count=n * k, offset=at + 4 * n * (1 + k)).reshape(n, k)
        if at + 4 * n * (1 + 2 * k) != len(payload):
            raise WireError(f"top-k frame of {len(payload)} bytes, its head says {at + 4 * n * (1 + 2 * k)}")
        names = {int(i): str(name) for i, name in head["names"].items()}
        return ModelTop(counts, indices, scores, names)
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"unreadable top-k frame: {exc}") from exc
