"""`ugt jobs`: submit, list, wait for or cancel the UGT Flink jobs on the running standalone cluster.

    ugt jobs submit tokenize --detached -- --parallelism 2
    ugt jobs submit all -- --bounded --startup earliest   # + item_semantic_ids once a semantic-ID version is active
    ugt jobs submit feedback_join --detached -- --attribution-min 30   # experiment metrics (docs/EXPERIMENTS.md)
    ugt jobs list
    ugt jobs wait tokenize --timeout 600
    ugt jobs cancel user_state
    ugt jobs stop user_state                              # stop with a savepoint; prints where it is
    ugt jobs submit user_state --detached --from-savepoint <path> -- <the job's args>   # resume (or upgrade)
    ugt jobs rebuild-user-state                           # Redis lost its data: user_state's rows from the lake

`submit` runs `<pyflink>/bin/flink run [-d] [-s <savepoint> [-n]] -py jobs/<job>_job.py <job args>` with the stack's
FLINK_CONF_DIR (infra.flink_home.flink_env); the others use Flink's REST API at Settings.flink_rest_url.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from infra.settings import REPO_ROOT, get_settings

JOBS = ("tokenize", "user_state")  # `submit all` and the demo
EXPERIMENT_JOB = "feedback_join"  # joins impressions with feedback; submitted on its own (needs impressions)
ITEM_JOB = "item_semantic_ids"  # `submit all` adds it once an artifact is registered for the active version
SUBMITTABLE = (*JOBS, ITEM_JOB, EXPERIMENT_JOB)  # what `submit <job>` accepts


def job_file(job: str) -> Path:
    """The PyFlink entry file of a job: jobs/<job>_job.py (never a bare `<job>.py`: `flink run -py` puts jobs/ on
    sys.path, where `tokenize.py` would shadow the standard library's tokenize)."""
    return REPO_ROOT / "jobs" / f"{job}_job.py"
TERMINAL = {"FINISHED", "FAILED", "CANCELED"}
JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")


class JobsError(RuntimeError):
    """The cluster is unreachable, a job is unknown, or a submission failed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    submit = sub.add_parser("submit", help="submit a job (or all: tokenize, user_state, and item_semantic_ids when a "
                            "semantic-ID version is active) with `flink run -py`",
                            description="Arguments after `--` go to the job (see `python jobs/<job>_job.py --help`).")
    submit.add_argument("job", choices=(*SUBMITTABLE, "all"))
    submit.add_argument("--detached", action="store_true", help="return once submitted (flink run -d)")
    submit.add_argument("--from-savepoint", metavar="PATH", default=None,
                        help="start from this savepoint (or retained checkpoint): keyed state, timers and Kafka "
                             "offsets as they were when it was taken (flink run -s)")
    submit.add_argument("--allow-non-restored-state", action="store_true",
                        help="with --from-savepoint: skip savepoint state that no operator of the new job claims "
                             "(flink run -n), e.g. after the job graph changed; the Kafka sources then start from "
                             "the consumer group's committed offsets")
    submit.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the job's own options")
    sub.add_parser("list", help="list jobs on the cluster (id, name, state, duration)")
    wait = sub.add_parser("wait", help="wait until a job (id or name) ends; exit 0 only if it FINISHED")
    wait.add_argument("job", help="job id or name (the newest job of that name)")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds (default: %(default)s)")
    cancel = sub.add_parser("cancel", help="cancel a running job by id, or every running job of a name")
    cancel.add_argument("job", help="job id or name")
    stop = sub.add_parser("stop", help="stop a running job (id, or every running job of a name) with a savepoint, "
                                       "to resume or upgrade it later with `submit --from-savepoint`")
    stop.add_argument("job", help="job id or name")
    stop.add_argument("--savepoint-dir", default=None,
                      help="where to write the savepoint (default: the cluster's execution.checkpointing."
                           "savepoint-dir, var/flink/savepoints on the stack)")
    stop.add_argument("--drain", action="store_true",
                      help="fire every timer and end the job's windows first (only when it will not be resumed)")
    stop.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the savepoint "
                                                                  "(default: %(default)s)")
    from jobs.user_state_rebuild import add_arguments as add_rebuild_arguments

    add_rebuild_arguments(sub.add_parser(
        "rebuild-user-state", help="rebuild user_state's Redis data (Feast rows, popularity) from the token lake "
                                   "after Redis lost it; stop user_state first (docs/STACK.md)"))
    parser.add_argument("--rest", default=None, help="Flink REST URL (default: Settings.flink_rest_url)")


SUBMIT_FLAGS = {"--detached": "detached", "--allow-non-restored-state": "allow_non_restored_state"}
SUBMIT_VALUES = {"--from-savepoint": "from_savepoint"}


def split_submit_args(args: argparse.Namespace) -> argparse.Namespace:
    """Move `submit`'s own options out of job_args: argparse's REMAINDER takes everything after the job name, so
    `submit user_state --detached --from-savepoint P -- --max-events 5` arrives as job_args. Before a `--` every
    token must be one of submit's options; without one (argparse drops a `--` that directly follows the job name)
    submit's options are read up to the first token that is not one, and the rest goes to the job."""
    rest = list(args.job_args)
    strict = "--" in rest
    cut = rest.index("--") if strict else len(rest)
    own, after = rest[:cut], rest[cut + 1:]
    i = 0
    while i < len(own):
        name, _, inline = own[i].partition("=")
        if name in SUBMIT_FLAGS and not inline:
            setattr(args, SUBMIT_FLAGS[name], True)
        elif name in SUBMIT_VALUES:
            if not inline and i + 1 >= len(own):
                raise JobsError(f"{name} needs a value")
            setattr(args, SUBMIT_VALUES[name], inline or own[i + 1])
            i += 0 if inline else 1
        elif strict:
            raise JobsError(f"unknown `ugt jobs submit` option {own[i]!r}; the job's own options go after `--` "
                            f"(e.g. `ugt jobs submit {args.job} --detached -- --parallelism 2`)")
        else:
            after = own[i:]
            break
        i += 1
    args.job_args = after
    return args


def rest_url(args: argparse.Namespace) -> str:
    return (getattr(args, "rest", None) or get_settings().flink_rest_url).rstrip("/")


def _get(url: str) -> Any:
    try:
        response = requests.get(url, timeout=10)
    except requests.RequestException as exc:
        raise JobsError(f"Flink REST API at {url} is unreachable ({exc.__class__.__name__}); is the stack up? "
                        "Run `ugt stack up`.") from exc
    if not response.ok:
        raise JobsError(f"GET {url} -> {response.status_code}: {response.text[:300]}")
    return response.json()


def list_jobs(base: str) -> list[dict[str, Any]]:
    """Jobs on the cluster, newest first: jid, name, state, start-time, duration (ms)."""
    jobs = _get(f"{base}/jobs/overview").get("jobs", [])
    return sorted(jobs, key=lambda j: j.get("start-time", 0), reverse=True)


def resolve(base: str, ref: str, running_only: bool = False) -> list[dict[str, Any]]:
    """Jobs matching an id or a name (all running ones of a name, or the newest when not running_only)."""
    jobs = list_jobs(base)
    by_id = [j for j in jobs if j["jid"] == ref]
    if by_id:
        return by_id
    named = [j for j in jobs if j["name"] == ref]
    if running_only:
        named = [j for j in named if j["state"] not in TERMINAL]
    elif named:
        named = named[:1]
    if not named:
        known = ", ".join(sorted({j["name"] for j in jobs})) or "none"
        raise JobsError(f"no {'running ' if running_only else ''}job with id or name {ref!r} (jobs: {known})")
    return named


def job_command(job: str, job_args: list[str], detached: bool, savepoint: str | None = None,
                allow_non_restored: bool = False) -> list[str]:
    from infra.flink_home import flink_bin

    if allow_non_restored and not savepoint:
        raise JobsError("--allow-non-restored-state only applies with --from-savepoint")
    args = job_args[1:] if job_args[:1] == ["--"] else job_args
    restore = ["-s", savepoint, *(["-n"] if allow_non_restored else [])] if savepoint else []
    return [str(flink_bin()), "run", *(["-d"] if detached else []), *restore,
            "-py", str(job_file(job)), *args]


def submit(job: str, job_args: list[str], detached: bool, savepoint: str | None = None,
           allow_non_restored: bool = False) -> str | None:
    """Run `flink run -py` (from a savepoint when given); returns the job id it printed (None if it printed none)."""
    from infra.flink_home import flink_env

    if savepoint and not savepoint_exists(savepoint):
        raise JobsError(f"no savepoint at {savepoint}: pass the path `ugt jobs stop` printed (a folder holding "
                        "_metadata)")
    command = job_command(job, job_args, detached, savepoint, allow_non_restored)
    print("$ " + " ".join(command), flush=True)
    lines: list[str] = []
    with subprocess.Popen(command, env=flink_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            print(line, end="", flush=True)
    found = JOB_ID.search("".join(lines))
    if process.returncode != 0:
        raise JobsError(f"`flink run` for {job} exited with {process.returncode}; see the output above")
    return found.group(1) if found else None


def wait_placed(base: str, jid: str, timeout_s: float = 60.0) -> bool:
    """Wait until every task of the job has a slot (deploying, initializing or running), so the next job's slot
    request sees it: with slots spread evenly, each job then lands in a TaskManager of its own. False on timeout."""
    placed = {"DEPLOYING", "INITIALIZING", "RUNNING", "FINISHED"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _get(f"{base}/jobs/{jid}")
        if job["state"] in TERMINAL:
            return True
        vertices = job.get("vertices", [])
        if vertices and all(v["status"] in placed for v in vertices):
            return True
        time.sleep(0.5)
    return False


def jobs_for_all() -> tuple[str, ...]:
    """tokenize, user_state, and item_semantic_ids when it can start without arguments (an active artifact)."""
    import redis

    from contracts.redis_keys import active_version, artifact_path_of
    from infra.redis_client import redis_client

    try:
        client = redis_client(get_settings())
        version = active_version(client)
        path = artifact_path_of(client, version) if version else None
    except redis.RedisError:
        path = None
    if path is None:
        print(f"{ITEM_JOB}: not submitted (no semantic-ID version is active yet); submit it once with "
              f"`ugt jobs submit {ITEM_JOB} --detached -- --artifact <dir>` (the demo does)")
        return JOBS
    return (*JOBS, ITEM_JOB)


def operator_counter(base: str, job: str, operator: str, counter: str, group: str = "ugt") -> int:
    """A running job's operator counter summed over its subtasks (0 when no such job or operator runs).

    Counters live with the job: a resubmitted job starts them at 0, so callers compare against a value read
    from the same job run.
    """
    running = [j for j in list_jobs(base) if j["name"] == job and j["state"] == "RUNNING"]
    if not running:
        return 0
    jid = running[0]["jid"]
    vertices = [v for v in _get(f"{base}/jobs/{jid}").get("vertices", []) if v["name"].startswith(operator)]
    if not vertices:
        return 0
    metric = f"{operator}.{group}.{counter}"
    values = _get(f"{base}/jobs/{jid}/vertices/{vertices[0]['id']}/subtasks/metrics?get={metric}&agg=sum")
    return int(values[0]["sum"]) if values else 0


def root_cause(trace: str) -> str:
    """The last "Caused by" line of a Java stack trace (its first line when it has none)."""
    causes = re.findall(r"Caused by: ([^\n]+)", trace)
    return causes[-1] if causes else trace.split("\n", 1)[0]


def failure_cause(base: str, jid: str) -> str | None:
    """None while the job is healthy; else its state and root cause (the last "Caused by" of its latest exception),
    so a caller waiting on a restart loop can stop at once and say why."""
    state = _get(f"{base}/jobs/{jid}")["state"]
    if state not in ("FAILED", "FAILING", "RESTARTING"):
        return None
    entries = _get(f"{base}/jobs/{jid}/exceptions").get("exceptionHistory", {}).get("entries") or [{}]
    trace = entries[0].get("stacktrace", "")
    return f"{state}: {root_cause(trace)}"


def wait(base: str, ref: str, timeout_s: float) -> str:
    """Poll until the job ends; returns its final state."""
    deadline = time.monotonic() + timeout_s
    jid = resolve(base, ref)[0]["jid"]
    while True:
        state = _get(f"{base}/jobs/{jid}")["state"]
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise JobsError(f"job {ref} ({jid}) still {state} after {timeout_s:.0f} s")
        time.sleep(1.0)


def cancel(base: str, ref: str) -> list[str]:
    cancelled = []
    for job in resolve(base, ref, running_only=True):
        response = requests.patch(f"{base}/jobs/{job['jid']}", params={"mode": "cancel"}, timeout=10)
        if response.status_code not in (200, 202):
            raise JobsError(f"cancelling {job['jid']} -> {response.status_code}: {response.text[:300]}")
        cancelled.append(job["jid"])
    return cancelled


def savepoint_exists(path: str) -> bool:
    """A local savepoint or retained checkpoint folder (file:// URI or path) holds _metadata."""
    parsed = urlparse(path)
    if parsed.scheme not in ("", "file"):
        return True  # a remote file system: Flink checks it
    local = Path(parsed.path if parsed.scheme == "file" else path)
    return (local / "_metadata").is_file() or (local.name == "_metadata" and local.is_file())


def stop_with_savepoint(base: str, ref: str, target_dir: str | None = None, drain: bool = False,
                        timeout_s: float = 300.0) -> list[tuple[str, str]]:
    """Stop every running job matching `ref` with a savepoint (POST /jobs/<id>/stop, then poll the trigger);
    returns (job id, savepoint location) pairs. The job's sources stop at a barrier, so nothing after the
    savepoint is processed: resuming from it continues exactly where the job stopped."""
    stopped = []
    for job in resolve(base, ref, running_only=True):
        jid = job["jid"]
        body: dict[str, Any] = {"drain": drain, "formatType": "CANONICAL"}
        if target_dir:
            body["targetDirectory"] = Path(target_dir).resolve().as_uri() if "://" not in target_dir else target_dir
        try:
            response = requests.post(f"{base}/jobs/{jid}/stop", json=body, timeout=10)
        except requests.RequestException as exc:
            raise JobsError(f"Flink REST API at {base} is unreachable ({exc.__class__.__name__})") from exc
        if response.status_code not in (200, 202):
            raise JobsError(f"stopping {jid} -> {response.status_code}: {response.text[:300]}")
        trigger = response.json()["request-id"]
        deadline = time.monotonic() + timeout_s
        while True:
            status = _get(f"{base}/jobs/{jid}/savepoints/{trigger}")
            if status["status"]["id"] == "COMPLETED":
                operation = status.get("operation") or {}
                if "location" not in operation:
                    trace = (operation.get("failure-cause") or {}).get("stack-trace", "")
                    raise JobsError(f"stop-with-savepoint of {jid} failed: {root_cause(trace)} (the job keeps running "
                                    "unless it failed; see `ugt jobs list`)")
                stopped.append((jid, operation["location"]))
                break
            if time.monotonic() > deadline:
                raise JobsError(f"the savepoint of {jid} did not complete within {timeout_s:.0f} s")
            time.sleep(0.5)
    return stopped


def run(args: argparse.Namespace) -> int:
    base = rest_url(args)
    try:
        if args.action == "submit":
            split_submit_args(args)
            for job in jobs_for_all() if args.job == "all" else (args.job,):
                # `all` runs both at once, so it is always detached (a blocking tokenize would hold user_state back)
                if args.from_savepoint and args.job == "all":
                    raise JobsError("--from-savepoint takes one job: each job has its own savepoint")
                jid = submit(job, args.job_args, args.detached or args.job == "all", args.from_savepoint,
                             args.allow_non_restored_state)
                print(f"{job}: submitted{' as ' + jid if jid else ''}")
                if args.job == "all" and jid and not wait_placed(base, jid):
                    print(f"{job}: not all its tasks have a slot after 60 s (see `ugt jobs list`, the Flink UI)")
        elif args.action == "list":
            jobs = list_jobs(base)
            print(f"{'id':32s}  {'name':12s}  {'state':10s}  duration")
            for j in jobs:
                print(f"{j['jid']}  {j['name']:12s}  {j['state']:10s}  {j.get('duration', 0) / 1000:.1f} s")
        elif args.action == "wait":
            state = wait(base, args.job, args.timeout)
            print(state)
            return 0 if state == "FINISHED" else 1
        elif args.action == "cancel":
            for jid in cancel(base, args.job):
                print(f"cancelled {jid}")
            print("note: cancel discards the job's state (user_state's users, timers); `ugt jobs stop` keeps it in a "
                  "savepoint to resume from")
        elif args.action == "rebuild-user-state":
            from jobs.user_state_rebuild import rebuild

            return rebuild(args, base)
        elif args.action == "stop":
            for jid, location in stop_with_savepoint(base, args.job, args.savepoint_dir, args.drain, args.timeout):
                print(f"stopped {jid}; savepoint {location}")
                print(f"  resume: ugt jobs submit <job> --detached --from-savepoint {location} -- <the job's args>")
    except JobsError as exc:
        print(f"ugt jobs: {exc}", file=sys.stderr)
        return 1
    return 0
