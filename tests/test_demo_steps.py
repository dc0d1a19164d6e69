"""ugt/demo_steps.py and the demo's serving config: the known movie, /similar read as titles (a new item asked again
until the index has it), the similar index in the config."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from ugt.demo import write_serving_config
from ugt.demo_steps import known_item, similar_titles


def test_the_known_movie_is_found_by_title_else_the_fallback() -> None:
    assert known_item({"1": "Toy Story", "2503": "Matrix, The"}, "1") == "2503"
    assert known_item({"1": "Toy Story"}, "1") == "1"


def test_the_demo_serving_config_names_the_similar_index(tmp_path) -> None:
    path = write_serving_config(tmp_path / "demo", tmp_path / "checkpoint.pt", tmp_path / "similar")
    config = yaml.safe_load(path.read_text())
    assert config["generator"] == "ugt" and config["similar_index"] == str(tmp_path / "similar")
    without = yaml.safe_load(write_serving_config(tmp_path / "b", tmp_path / "c.pt").read_text())
    assert without["similar_index"] == ""  # the default config's: off


class _Similar(BaseHTTPRequestHandler):
    """404 for the new item until it has been asked twice (the index takes it from the feed), then neighbours."""

    asked: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        item = self.path.split("/similar/", 1)[1].split("?", 1)[0]
        self.asked[item] = self.asked.get(item, 0) + 1
        if item == "bad":
            body, status = {"error": "invalid_request"}, 422
        elif item == "new" and self.asked[item] <= 2:
            body, status = {"error": "not_found"}, 404
        else:
            body, status = {"item_id": item, "items": [{"item_id": "1", "score": 0.91}, {"item_id": "x", "score": 0.5}],
                            "model": "similar-test"}, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_similar_titles_waits_for_a_new_item_and_names_titles() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Similar)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert similar_titles(base, "new", {"1": "Toy Story"}, timeout_s=10) == ["Toy Story (0.91)", "x (0.50)"]
        assert _Similar.asked["new"] == 3
        assert similar_titles(base, "bad", {}, timeout_s=10) is None  # not a 404: no retry
        assert _Similar.asked["bad"] == 1
    finally:
        server.shutdown()
