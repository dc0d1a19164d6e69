"""The HTTP floor of the candidate front-end stacks: worker CPU per request of a trivial /recommend, side by side.

The GPU host's end-to-end bench found the `ugt serve --workers N` workers' CPU the limit, and a trivial FastAPI
endpoint there peaks at ~29k req/s on 8 workers: the HTTP stack alone is a large share of the budget. This bench
puts a number on each candidate stack with the same trivial endpoint (read the body, parse its JSON with orjson,
answer a constant body shaped like a real answer), each served by W worker processes, all servers up at once:

* ``uvicorn-fastapi``: uvicorn (uvloop + httptools) + a FastAPI route (what bench/serving.py's anchor is);
* ``uvicorn-starlette``: uvicorn + a plain Starlette route (no FastAPI dependency or validation machinery);
* ``uvicorn-asgi``: uvicorn + a bare ASGI callable (the shape of serving/app.py's direct lane for /recommend);
* ``granian-asgi``: granian (Rust HTTP server, uvloop) + the same bare ASGI callable;
* ``granian-rsgi``: granian + the same handler on its RSGI interface (no ASGI message dicts).

granian is not a UGT dependency (it measured no better than uvicorn + a bare ASGI callable here): its stacks run
when it is importable, e.g. installed with ``uv pip install --target DIR granian`` and DIR on PYTHONPATH.

Load: bench/e2e_load.py's open-loop client (Poisson arrivals, keep-alive connections, latency from each
request's scheduled time) in its own processes. Each offered rate goes to every stack in turn (the order
alternates per round) so a slow spell of a shared machine hits all of them. The CPU is the server's process
tree (the workers; the idle supervisor's share is nil), user + system, over the window / requests sent.

  python -m bench.http_floor --rates 1000,3000 --duration 8 --repeats 2 --port-base 22000
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request  # module level: FastAPI resolves the handlers' annotations here

from bench.common import REPO, print_table, result_path, write_result
from bench.e2e_load import make_schedule, run_load, share
from bench.http_load import pct
from bench.proc_cpu import tree_cpu_seconds

STACKS = ("uvicorn-fastapi", "uvicorn-starlette", "uvicorn-asgi", "granian-asgi", "granian-rsgi")
# a constant answer shaped like /recommend's (10 items, the timings, the experiment fields): ~700 bytes
ANSWER = orjson.dumps({
    "request_id": "9f1c2e4b7a0d4d6e8b1f3a5c7e9d0b2a", "experiment": None, "arm": None, "user_id": "4242",
    "items": [{"item_id": str(1000 + i), "score": 12.5 - i} for i in range(10)], "fallback": False,
    "fallback_reason": None, "model": "ugt-ml1m-demo-v1", "batch_size": 8,
    "timings_ms": {"queue": 0.5, "state": 0.21, "generate": 3.05, "rerank": 0.01, "total": 4.12},
})
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


# -- the trivial endpoints -----------------------------------------------------------------------------------
async def asgi_app(scope: dict, receive: Any, send: Any) -> None:
    """A bare ASGI /recommend: the body read, parsed, and a constant answer (lifespan accepted)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    orjson.loads(body)
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


class RSGIApp:
    """The same endpoint on granian's RSGI interface: the body in one await, the answer in one call."""

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        orjson.loads(await protocol())
        protocol.response_bytes(200, [("content-type", "application/json")], ANSWER)


rsgi_app = RSGIApp()


def starlette_app():  # -> Starlette
    """uvicorn + a plain Starlette route (factory: uvicorn's workers import it)."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def recommend(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(ANSWER, media_type="application/json")

    return Starlette(routes=[Route("/recommend", recommend, methods=["POST"])])


def fastapi_app():  # -> FastAPI
    """uvicorn + a FastAPI route reading the raw request (no body model): FastAPI's routing and wrappers."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.post("/recommend")
    async def recommend(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(content=ANSWER, media_type="application/json")

    return app


def serve(stack: str, port: int, workers: int) -> None:
    """Run one stack's server in this process (its workers are its children) until terminated."""
    if stack.startswith("uvicorn"):
        import uvicorn

        target = {"uvicorn-fastapi": "bench.http_floor:fastapi_app", "uvicorn-starlette": "bench.http_floor:starlette_app",
                  "uvicorn-asgi": "bench.http_floor:asgi_app"}[stack]
        uvicorn.run(target, factory=stack != "uvicorn-asgi", workers=workers, host="127.0.0.1", port=port,
                    log_level="warning", access_log=False, loop="uvloop", http="httptools")
        return
    from granian import Granian

    interface = stack.removeprefix("granian-")
    Granian(f"bench.http_floor:{interface}_app", address="127.0.0.1", port=port, interface=interface,
            workers=workers, loop="uvloop", websockets=False, log_level="warning", backlog=2048).serve()


# -- driving them --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.http_floor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", default=",".join(STACKS), help="comma list of: " + ", ".join(STACKS))
    p.add_argument("--workers", type=int, default=2, help="worker processes of every server")
    p.add_argument("--rates", default="1000,3000", help="offered req/s, comma list")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per rate and stack")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the rates (every stack once per rate)")
    p.add_argument("--load-processes", type=int, default=1)
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--port-base", type=int, default=22000, help="the stacks listen on port-base, port-base+1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(result_path("http_floor")), help="result file (default: %(default)s)")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: run one stack's server
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def start(stack: str, port: int, workers: int, logdir: Path) -> subprocess.Popen:
    log = (logdir / f"{stack}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "bench.http_floor", "--serve", stack, "--port", str(port),
                             "--workers", str(workers)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_up(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited ({proc.returncode})")
        try:
            if requests.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": "1"}, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server on {port} did not answer in {timeout_s:.0f} s")


def drive(stack: str, port: int, pid: int, rate: float, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One open-loop window at ``rate`` on one server: latency, errors, and its CPU per request."""
    schedule = make_schedule(rate, args.duration, (0.0, 1.0, 0.0), 1, 1, seed)
    share(schedule=schedule, users=SimpleNamespace(ids=["4242"]))
    before = tree_cpu_seconds(pid)
    start_at = time.time() + 0.5
    P = args.load_processes
    with multiprocessing.get_context("fork").Pool(P) as pool:
        parts = pool.starmap(run_load, [(port, start_at, p, P, 10, args.max_connections) for p in range(P)])
    spent = tree_cpu_seconds(pid) - before
    latency = np.concatenate([part["latency_ms"] for part in parts]).tolist()
    status = np.concatenate([part["status"] for part in parts])
    n = max(len(latency), 1)
    return {"stack": stack, "offered_qps": rate, "requests": len(latency), "errors": int((status != 200).sum()),
            "p50_ms": round(pct(latency, 50), 2), "p99_ms": round(pct(latency, 99), 2),
            "worker_cpu_ms_per_req": round(1000.0 * spent / n, 4),
            "load_cpu_ms_per_req": round(1000.0 * sum(p["cpu_s"] for p in parts) / n, 4),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def summary(rows: list[dict[str, Any]], stacks: list[str]) -> list[dict[str, Any]]:
    """Per stack and rate: the mean CPU per request over the rounds, and its ratio to uvicorn-fastapi's."""
    out = []
    for rate in sorted({r["offered_qps"] for r in rows}):
        means = {}
        for stack in stacks:
            got = [r["worker_cpu_ms_per_req"] for r in rows if r["stack"] == stack and r["offered_qps"] == rate]
            means[stack] = sum(got) / len(got) if got else None
        base = means.get("uvicorn-fastapi")
        for stack, mean in means.items():
            out.append({"stack": stack, "offered_qps": rate, "worker_cpu_ms_per_req": round(mean, 4),
                        "vs_uvicorn_fastapi": round(mean / base, 3) if base else None})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    stacks = [s for s in args.stacks.split(",") if s]
    unknown = set(stacks) - set(STACKS)
    if unknown:
        raise SystemExit(f"unknown stacks {sorted(unknown)}; choose from {STACKS}")
    if importlib.util.find_spec("granian") is None and any(s.startswith("granian") for s in stacks):
        print("granian is not installed (not a UGT dependency): its stacks are left out; "
              "`uv pip install granian` (e.g. into a --target folder on PYTHONPATH) to measure them")
        stacks = [s for s in stacks if not s.startswith("granian")]
    logdir = Path(tempfile.mkdtemp(prefix="ugt-http-floor-"))
    ports = {stack: args.port_base + i for i, stack in enumerate(stacks)}
    procs = {stack: start(stack, ports[stack], args.workers, logdir) for stack in stacks}
    rows: list[dict[str, Any]] = []
    try:
        for stack in stacks:
            wait_up(ports[stack], procs[stack])
            drive(stack, ports[stack], procs[stack].pid, 300.0, args, seed=999)  # every worker warm
        rates = [float(r) for r in args.rates.split(",") if r]
        for repeat in range(args.repeats):
            for i, rate in enumerate(rates):
                order = stacks if (repeat + i) % 2 == 0 else stacks[::-1]
                for stack in order:
                    row = drive(stack, ports[stack], procs[stack].pid, rate, args, args.seed + 100 * repeat + i)
                    row["repeat"] = repeat
                    rows.append(row)
                    print_table([row])
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"rows": rows, "summary": summary(rows, stacks)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.workers)
        return 0
    conditions = {k: v for k, v in vars(args).items() if k not in ("out", "serve", "port")}
    conditions["endpoint"] = (f"POST /recommend: body read, orjson.loads, a constant {len(ANSWER)}-byte JSON answer; "
                              "load: bench/e2e_load.py's open-loop client, one user's small JSON body")
    conditions["measured"] = ("worker_cpu_ms_per_req: user + system CPU of the server's process tree (psutil) over "
                              "the window / requests sent; load_cpu_ms_per_req: the load processes' own")
    conditions["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = run(args)
    print_table(result["summary"])
    write_result(Path(args.out), "http_floor", conditions, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
