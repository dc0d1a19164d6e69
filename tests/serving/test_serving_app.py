"""The HTTP layer with fake parts: request bounds and error bodies, fallback marking, metrics, health."""

import time

import pytest
from fastapi.testclient import TestClient
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from serving.app import create_app
from serving.config import ServingConfig
from serving.fallback import PopularityFallback, PopularityGenerator
from serving.generator import ScoredItem
from serving.http_models import RecommendRequest
from serving.reranker import FilterReranker
from serving.service import Components
from serving.user_state_reader import BadState, StateUnavailable

POPULAR = {"ugt:popularity:movie": {f"m{i}": 100 - i for i in range(1, 21)}, "ugt:popularity:book": {"b1": 3}}


class BrokenGenerator:
    name, version = "broken", "v0"

    def recommend(self, state, k, exclude, *, domain):
        raise RuntimeError("model exploded")


def client_for(reader=None, redis=None, generator=None, file_items=None, **config) -> TestClient:
    redis = redis or FakeZsetRedis(POPULAR)
    fallback = PopularityFallback(redis, file_items, clock=FakeClock())
    parts = Components(
        state_reader=reader or FakeStateReader({"u1": view("u1", ["m1", "m3"])}),
        generator=generator or PopularityGenerator(fallback),
        fallback=fallback,
        reranker=FilterReranker(),
    )
    return TestClient(create_app(config=ServingConfig(**config), components=parts, client=redis))


def ids(body) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_known_user_gets_the_main_model_without_seen_items():
    r = client_for().post("/recommend", json={"user_id": "u1", "k": 3, "exclude": ["m2"]})
    assert r.status_code == 200
    body = r.json()
    assert ids(body) == ["m4", "m5", "m6"]
    assert body["items"][0]["score"] == 96.0
    assert body["fallback"] is False and body["fallback_reason"] is None
    assert body["model"] == "popularity-v1"
    assert set(body["timings_ms"]) == {"queue", "state", "generate", "rerank", "total"}
    assert body["batch_size"] == 1
    assert body["timings_ms"]["total"] >= body["timings_ms"]["state"]


def test_unknown_user_gets_the_fallback_marked():
    body = client_for().post("/recommend", json={"user_id": "new", "k": 2}).json()
    assert ids(body) == ["m1", "m2"]
    assert body["fallback"] is True and body["fallback_reason"] == "unknown_user"
    assert body["model"] == "popularity-fallback-v1"


def test_domain_picks_the_popularity_set():
    body = client_for().post("/recommend", json={"user_id": "new", "k": 5, "domain": "book"}).json()
    assert ids(body) == ["b1"]


@pytest.mark.parametrize(
    "error, reason",
    [
        (StateUnavailable("Connection refused"), "state_unavailable"),
        (BadState("lists differ"), "bad_state"),
        (KeyError("surprise"), "state_unavailable"),
    ],
)
def test_state_failures_answer_from_the_fallback(error, reason):
    client = client_for(reader=FakeStateReader(error=error))
    r = client.post("/recommend", json={"user_id": "u1", "k": 2, "exclude": ["m1"]})
    assert r.status_code == 200
    assert ids(r.json()) == ["m2", "m3"] and r.json()["fallback_reason"] == reason
    assert f'ugt_serving_fallbacks_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text


def test_generator_error_answers_from_the_fallback_without_history():
    body = client_for(generator=BrokenGenerator()).post("/recommend", json={"user_id": "u1", "k": 2}).json()
    assert ids(body) == ["m2", "m4"]  # m1 and m3 are in u1's history
    assert body["fallback_reason"] == "generator_error"


def test_redis_down_answers_from_the_popularity_file():
    redis = FakeZsetRedis(POPULAR)
    redis.down = True
    client = client_for(
        reader=FakeStateReader(error=StateUnavailable("down")),
        redis=redis,
        file_items={"movie": [ScoredItem("f1", 9.0), ScoredItem("f2", 8.0)]},
    )
    body = client.post("/recommend", json={"user_id": "u1", "k": 5}).json()
    assert ids(body) == ["f1", "f2"] and body["fallback_reason"] == "state_unavailable"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert (
        health.json()["checks"]["redis"]["ok"] is False
        and health.json()["checks"]["popularity"]["ok"] is True
    )


def test_nothing_available_is_503_with_a_message():
    redis = FakeZsetRedis()
    redis.down = True
    client = client_for(reader=FakeStateReader(error=StateUnavailable("down")), redis=redis)
    r = client.post("/recommend", json={"user_id": "u1", "k": 5})
    assert r.status_code == 503
    assert r.json()["error"] == "no_recommendations" and "ugt:popularity:movie" in r.json()["message"]
    assert client.get("/health").status_code == 503


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"k": 3}, "user_id", "Field required"),
        ({"user_id": "", "k": 3}, "user_id", "at least 1 character"),
        ({"user_id": "   "}, "user_id", "blank"),
        ({"user_id": "x" * 257}, "user_id", "at most 256"),
        ({"user_id": 42}, "user_id", "valid string"),
        ({"user_id": "u1", "k": 0}, "k", "greater than or equal to 1"),
        ({"user_id": "u1", "k": 1001}, "k", "less than or equal to 1000"),
        ({"user_id": "u1", "k": "3"}, "k", "valid integer"),
        ({"user_id": "u1", "k": 2.5}, "k", "valid integer"),
        ({"user_id": "u1", "k": True}, "k", "valid integer"),
        ({"user_id": "u1", "exclude": "m1"}, "exclude", "valid array"),
        ({"user_id": "u1", "exclude": ["m1", ""]}, "exclude.1", "at least 1 character"),
        ({"user_id": "u1", "domain": "a b"}, "domain", "pattern"),
        ({"user_id": "u1", "kk": 3}, "kk", "Extra inputs"),
    ],
)
def test_bad_fields_are_422_naming_the_field(body, field, words):
    r = client_for().post("/recommend", json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["error"] == "invalid_request"
    assert field in [e["field"] for e in payload["errors"]]
    assert words in payload["message"]


def test_boundaries_are_accepted():
    client = client_for()
    assert client.post("/recommend", json={"user_id": "x" * 256, "k": 1000}).status_code == 200
    assert client.post("/recommend", json={"user_id": "u", "k": 1}).status_code == 200


def test_exclude_longer_than_configured_is_422():
    r = client_for(max_exclude=2).post("/recommend", json={"user_id": "u1", "exclude": ["a", "b", "c"]})
    assert r.status_code == 422 and "at most 2" in r.json()["message"]


def test_bad_json_and_missing_body_are_400():
    client = client_for()
    r = client.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    r = client.post("/recommend", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "missing_body"
    r = client.post("/recommend", json=["u1"])
    assert r.status_code == 422 and "JSON object" in r.json()["message"]


def test_large_bodies_are_413_declared_or_streamed():
    client = client_for(max_body_bytes=2048)
    big = b'{"user_id": "u1", "exclude": [' + b",".join([b'"item"'] * 1000) + b"]}"
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "2048" in r.json()["message"]

    def chunks():  # no Content-Length: the middleware must count while reading
        for _ in range(10):
            yield b" " * 512

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_metrics_count_requests_stages_and_fallbacks():
    client = client_for()
    client.post("/recommend", json={"user_id": "u1", "k": 2})
    client.post("/recommend", json={"user_id": "new", "k": 2})
    client.post("/recommend", json={"user_id": "u1", "k": 0})
    text = client.get("/metrics").text
    assert 'ugt_serving_requests_total{endpoint="/recommend",status="200"} 2.0' in text
    assert 'ugt_serving_requests_total{endpoint="/recommend",status="422"} 1.0' in text
    assert 'ugt_serving_fallbacks_total{reason="unknown_user"} 1.0' in text
    for stage in ("state", "generate", "rerank", "total"):
        assert f'ugt_serving_stage_seconds_count{{stage="{stage}"}} 2.0' in text
    assert 'ugt_serving_popularity_source_total{source="redis"} 2.0' in text


def test_health_ok_when_every_part_works():
    r = client_for().get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == "popularity-v1"
    assert set(r.json()["checks"]) == {"redis", "state", "popularity"}


def test_openapi_documents_bounds_and_examples():
    spec = client_for().get("/openapi.json").json()
    request = spec["components"]["schemas"]["RecommendRequest"]
    assert (
        request["properties"]["k"]["maximum"] == 1000 and request["properties"]["user_id"]["maxLength"] == 256
    )
    operation = spec["paths"]["/recommend"]["post"]
    assert "examples" in operation["requestBody"]["content"]["application/json"]
    assert {"400", "413", "422", "503"} <= set(operation["responses"])


@pytest.mark.parametrize("user", ["u1", "new"])  # the model's path and the fallback's
def test_an_unknown_domain_is_the_clients_error_naming_the_known_domains(user):
    client = client_for(file_items={"music": [ScoredItem("s1", 1.0)]})
    assert client.post("/recommend", json={"user_id": "new", "k": 1, "domain": "book"}).status_code == 200
    r = client.post("/recommend", json={"user_id": user, "k": 3, "domain": "games"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["errors"] == [{"field": "domain", "message": r.json()["message"].removeprefix("domain: ")}]
    assert "'games' is not served" in r.json()["message"] and "['book', 'movie', 'music']" in r.json()["message"]
    assert 'ugt_serving_errors_total{kind="invalid_request"} 1.0' in client.get("/metrics").text


def test_an_unknown_domain_is_422_through_the_engine_process_too():
    with client_for(engine="process") as client:  # the refusal travels back from the forked engine as a frame
        r = client.post("/recommend", json={"user_id": "u1", "k": 3, "domain": "games"})
        assert r.status_code == 422 and "served domains: ['movie']" in r.json()["message"]
        assert client.post("/recommend", json={"user_id": "u1", "k": 1}).json()["fallback"] is False


def test_no_popularity_for_the_served_domain_or_with_redis_down_stays_503():
    empty = client_for(redis=FakeZsetRedis({"ugt:popularity:book": {"b1": 3}}))
    r = empty.post("/recommend", json={"user_id": "new", "k": 3})  # the default domain: the server is not ready
    assert r.status_code == 503 and "ugt:popularity:movie is empty" in r.json()["message"]
    down = FakeZsetRedis(POPULAR)
    down.down = True  # Redis cannot say whether the domain exists: the server's problem
    r = client_for(redis=down).post("/recommend", json={"user_id": "u1", "k": 3, "domain": "games"})
    assert r.status_code == 503 and "ugt:popularity:games is unreachable" in r.json()["message"]


def test_an_unknown_domain_fails_only_its_own_requests_of_a_batch():
    from serving.batcher import Queued
    from serving.metrics import ServingMetrics
    from serving.service import RecommendService, UnknownDomain

    fallback = PopularityFallback(FakeZsetRedis(POPULAR), clock=FakeClock())
    parts = Components(FakeStateReader({"u1": view("u1", ["m1"])}), PopularityGenerator(fallback), fallback,
                       FilterReranker())
    service = RecommendService(ServingConfig(), parts, ServingMetrics())
    games, movie = (RecommendRequest(user_id="u1", k=2, domain=d) for d in ("games", "movie"))
    now = time.perf_counter()
    answers = service.run_batch([Queued(games, now, None, None), Queued(movie, now, None, None)])
    assert isinstance(answers[0], UnknownDomain)
    assert [i.item_id for i in answers[1].items] == ["m2", "m3"] and answers[1].reason is None


def test_an_outage_is_logged_once_not_per_request(caplog):
    client = client_for(reader=FakeStateReader(error=StateUnavailable("Connection refused")))
    with caplog.at_level("WARNING", logger="serving.service"):
        for _ in range(5):
            assert client.post("/recommend", json={"user_id": "u1", "k": 1}).status_code == 200
    records = [r for r in caplog.records if "user state unavailable" in r.getMessage()]
    assert len(records) == 1 and "Connection refused" in records[0].getMessage()


class CudaGenerator(PopularityGenerator):
    """A generator whose engine says it runs on CUDA (the device check reads only ``engine.device``)."""

    class engine:  # noqa: N801 - stands in for UGTInference's attributes
        import torch

        device = torch.device("cuda")
        cache = None


def test_engine_process_with_a_model_on_cuda_fails_at_start_and_auto_picks_the_thread():
    from serving.batcher import DynamicBatcher
    from serving.config import ConfigError

    redis = FakeZsetRedis(POPULAR)
    fallback = PopularityFallback(redis, None, clock=FakeClock())

    def parts():
        return Components(state_reader=FakeStateReader({}), generator=CudaGenerator(fallback), fallback=fallback,
                          reranker=FilterReranker())

    with pytest.raises(ConfigError, match="CUDA does not survive a fork"):
        create_app(config=ServingConfig(engine="process"), components=parts(), client=redis)
    app = create_app(config=ServingConfig(engine="auto"), components=parts(), client=redis)
    assert isinstance(app.state.batcher, DynamicBatcher)


def test_request_ids_are_uuid4_hex():
    import uuid

    from serving.answers import request_ids

    ids = request_ids(64)
    assert len(set(ids)) == 64
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_the_answer_has_the_headers_and_body_of_a_json_response():
    r = client_for().post("/recommend", json={"user_id": "u1", "k": 2})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    body = r.json()
    assert list(body) == ["request_id", "experiment", "arm", "user_id", "items", "fallback", "fallback_reason",
                          "model", "batch_size", "timings_ms"]
    assert r.content.startswith(b'{"request_id":"') and b'"items":[{"item_id":"m2","score":98.0}' in r.content


def test_a_bad_content_length_is_400_and_counted():
    client = client_for()
    r = client.post("/recommend", content=b'{"user_id": "u1"}',
                    headers={"content-type": "application/json", "content-length": "x1"})
    assert r.status_code == 400 and r.json()["error"] == "bad_content_length"
    assert 'ugt_serving_requests_total{endpoint="/recommend",status="400"} 1.0' in client.get("/metrics").text
