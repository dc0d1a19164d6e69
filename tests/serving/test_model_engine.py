"""engine_scope: model, without sockets: the wire format of packed rows and top-k, and the engine's steps.

The model here is a stand-in whose top-k of a row is computed from the row itself (its first column and the
exclusions), so every answer can be checked against the frame it came from; the real model behind the same
engine is tested in tests/integration/test_serving_model_scope.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine_ipc import (
    ADMIT,
    ADMITTED,
    BUSY,
    FAILED,
    MODEL,
    MODEL_ANSWER,
    RATE_LIMITED,
    Frame,
    FrameDecoder,
)
from serving.engine_model import ModelCore
from serving.model_wire import (
    ModelRows,
    ModelTop,
    WireError,
    decode_rows,
    decode_top,
    encode_rows,
    encode_top,
)
from serving.ratelimit import RateLimiter


def rows(route: str, first: list[int], k: int = 3, width: int = 5, known: int = 200) -> ModelRows:
    n = len(first)
    vectors = np.zeros((n, width), dtype=np.int64)
    vectors[:, 0] = first
    excl = np.arange(n * 2, dtype=np.int64).reshape(n, 2)
    return ModelRows(route, k, [f"u{v}" for v in first], [bytes([v % 256]) * 16 for v in first], vectors, excl,
                     known)


def test_rows_and_top_k_cross_the_wire_unchanged():
    sent = rows("movie", [7, 9, 11])
    got = decode_rows(encode_rows(sent))
    assert (got.route, got.k, got.keys, got.prints) == (sent.route, sent.k, sent.keys, sent.prints)
    np.testing.assert_array_equal(got.vectors, sent.vectors)
    np.testing.assert_array_equal(got.excl, sent.excl)
    assert got.known == 200 and got.stream_users == [] and got.stream_vectors.shape == (0, 5)
    sent.stream_users, sent.stream_items = ["u7", "u9"], np.array([150, 151])
    sent.stream_vectors = np.arange(10).reshape(2, 5)
    got = decode_rows(encode_rows(sent))
    assert got.stream_users == ["u7", "u9"] and got.stream_items.tolist() == [150, 151]
    np.testing.assert_array_equal(got.stream_vectors, sent.stream_vectors)
    sent.stream_items = np.array([150])
    with pytest.raises(WireError, match="stream users"):
        encode_rows(sent)
    top = ModelTop(np.array([2, 1]), np.array([[5, 6], [7, 0]]), np.array([[0.5, 0.25], [1.0, 0.0]]), {7: "new"})
    back = decode_top(encode_top(top))
    np.testing.assert_array_equal(back.counts, [2, 1])
    np.testing.assert_array_equal(back.indices, top.indices)
    np.testing.assert_allclose(back.scores, top.scores)
    assert back.names == {7: "new"}


def test_broken_frames_and_values_outside_int32_are_refused():
    with pytest.raises(WireError, match="unreadable"):
        decode_rows(b"\x00\x00\x00\x05{bad")
    payload = encode_rows(rows("movie", [1, 2]))
    with pytest.raises(WireError, match="its head says"):
        decode_rows(payload + b"\x00" * 4)
    big = rows("movie", [1])
    big.vectors[0, 1] = 1 << 40
    with pytest.raises(WireError, match="int32"):
        encode_rows(big)


class _Pending:
    def __init__(self, vectors: np.ndarray, excl: np.ndarray, k: int):
        self.vectors, self.excl, self.k = vectors, excl, k

    def ready(self) -> bool:
        return True

    def arrays(self):
        n = len(self.vectors)
        indices = self.vectors[:, :1] + np.arange(self.k)  # row r's items: first, first + 1, ...
        scores = np.tile(np.linspace(1.0, 0.1, self.k), (n, 1))
        return np.full(n, self.k), indices, scores


class _Engine:
    def __init__(self):
        self.steps: list[tuple[int, list]] = []

    def submit_packed(self, vectors, excl, k, keys, prints):
        assert vectors.dtype == np.int64 and excl.shape[1] & (excl.shape[1] - 1) == 0  # a power of two
        self.steps.append((len(vectors), list(keys)))
        return _Pending(vectors, excl, k)


class _Model:
    num_items = 100

    def __init__(self):
        self.engine = _Engine()
        self.index_to_item = [str(i) for i in range(200)]

    def apply_new_items(self) -> int:
        return 0


def frame(ident: int, payload: bytes, kind: int = MODEL) -> Frame:
    return Frame(kind, ident, 0.0, payload)


def answers(out: dict[int, bytearray]) -> dict[int, dict[int, Frame]]:
    return {conn: {f.ident: f for f in FrameDecoder().feed(bytes(data))} for conn, data in out.items()}


def test_frames_of_two_workers_run_as_one_step_and_each_gets_its_rows_back():
    model = _Model()
    core = ModelCore({"movie": model}, max_rows=64, queue_max=100)
    assert core.admit(1, frame(10, encode_rows(rows("movie", [3, 4])))) is None
    assert core.admit(2, frame(20, encode_rows(rows("movie", [150], k=2, known=197)))) is None
    assert core.due_in() == 0.0
    got = answers(core.run_due())
    assert [n for n, _ in model.engine.steps] == [3]  # one step for both frames
    one = decode_top(got[1][10].payload)
    assert got[1][10].kind == MODEL_ANSWER
    np.testing.assert_array_equal(one.indices, [[3, 4, 5], [4, 5, 6]])
    two = decode_top(got[2][20].payload)
    assert two.indices.shape == (1, 3)  # the step's k is the largest asked
    assert two.names == {197: "197", 198: "198", 199: "199"}  # past the worker's vocabulary: named
    assert one.names == {}
    assert core.due_in() is None


def test_a_frame_of_no_rows_is_answered_at_once_with_the_items_the_worker_lacks():
    model = _Model()
    core = ModelCore({"movie": model}, max_rows=64, queue_max=100)
    reply = core.admit(1, frame(5, encode_rows(rows("movie", [], known=0))))
    (answer,) = FrameDecoder().feed(reply)
    top = decode_top(answer.payload)
    assert answer.kind == MODEL_ANSWER and top.indices.shape[0] == 0
    assert sorted(top.names) == list(range(101, 200))  # never the trained items, whatever the worker says
    assert core.due_in() is None and model.engine.steps == []


def test_a_step_takes_at_most_max_rows_and_the_queue_is_bounded():
    model = _Model()
    core = ModelCore({"movie": model}, max_rows=3, queue_max=4)
    assert core.admit(1, frame(1, encode_rows(rows("movie", [1, 2])))) is None
    assert core.admit(1, frame(2, encode_rows(rows("movie", [3, 4])))) is None
    refused = FrameDecoder().feed(core.admit(1, frame(3, encode_rows(rows("movie", [5])))) or b"")
    assert [f.kind for f in refused] == [BUSY]
    core.run_due()
    core.run_due()
    assert [n for n, _ in model.engine.steps] == [2, 2]  # 2 + 2 > 3: two steps


def test_an_unknown_model_is_refused_and_the_rate_limit_is_kept_here():
    core = ModelCore({"movie": _Model()}, max_rows=8, queue_max=8, limiter=RateLimiter(0.001, 1))
    refused = FrameDecoder().feed(core.admit(1, frame(1, encode_rows(rows("books", [1])))) or b"")
    assert refused[0].kind == FAILED and b"books" in refused[0].payload
    first = FrameDecoder().feed(core.admit_key(frame(2, b"key-a", ADMIT)))
    second = FrameDecoder().feed(core.admit_key(frame(3, b"key-a", ADMIT)))
    assert (first[0].kind, second[0].kind) == (ADMITTED, RATE_LIMITED)
    assert second[0].number > 0
