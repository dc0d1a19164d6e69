"""The quality benchmark's runs folder: one folder per row, resumable across GPU calls, packed small between them.

``<runs>/<row>/`` holds what `ugt train` writes (``summary.json`` once finished, ``last.pt`` while resumable,
``checkpoint.pt`` = the best state, logs, curves) and ``bench.json``, the bench's own record of the row: one entry
per call (when, on which device and commit, minutes, outcome). A call runs rows as parallel `ugt train`
subprocesses sharing the GPU; each gets ``UGT_TRAIN_DEADLINE`` (models/train.py) so it saves ``last.pt`` and exits
before the call ends, and the next call resumes it. Between calls only a tarball of the folder travels (no
``checkpoint.pt``; finished rows have no ``last.pt``), split in parts a device call can return.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.quality_rows import REPO, Row

INTERRUPTED_EXIT = 75  # models.train.INTERRUPTED_EXIT: stopped by the deadline, resumable
PART_BYTES = 15 * 2**20  # a device call returns files of at most 16 MiB
SKIP_IN_PACK = ("checkpoint.pt", "last.pt.partial")


def device_name() -> str:
    """The GPU (or CPU) the rows train on, with torch's version: what a row's call records."""
    try:
        import torch
    except ImportError:
        return "unknown"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"cpu (torch {torch.__version__}, {os.cpu_count()} cores)"


def record(folder: Path) -> dict[str, Any]:
    """The row's bench.json (its calls so far), empty for a row never run."""
    path = folder / "bench.json"
    return json.loads(path.read_text()) if path.exists() else {"calls": []}


def status(folder: Path) -> dict[str, Any]:
    """done / in progress (epoch reached) / pending, with the calls and minutes spent so far."""
    calls = record(folder)["calls"]
    state = "done" if (folder / "summary.json").exists() else "resumable" if (folder / "last.pt").exists() else (
        "failed" if calls and calls[-1]["outcome"] == "failed" else "pending")
    epoch = None
    log = folder / "log.jsonl"
    if log.exists() and state != "pending":
        lines = log.read_text().splitlines()
        epoch = json.loads(lines[-1])["epoch"] if lines else None
    return {"state": state, "calls": len(calls), "minutes": round(sum(c["minutes"] for c in calls), 2),
            "epoch": epoch}


def _command(row: Row, folder: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "ugt.cli", "train", "--config", row.config, "--out-dir", str(folder), "--quiet",
           "--set", f"name={row.name}"]
    for item in [*row.sets, *extra]:
        cmd += ["--set", item]
    if (folder / "last.pt").exists():
        cmd += ["--resume", str(folder / "last.pt")]
    return cmd


def launch(row: Row, runs_dir: Path, extra: list[str], train_deadline: float | None,
           kill_at: float | None) -> str:
    """One `ugt train` of ``row`` (resumed from its last.pt if any) in this call; killed at ``kill_at`` if it has
    not stopped by then. Appends the call to bench.json; returns its outcome."""
    folder = runs_dir / row.name
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    if train_deadline is not None:
        env["UGT_TRAIN_DEADLINE"] = f"{train_deadline:.0f}"
    resumed = (folder / "last.pt").exists()
    started = time.time()
    with open(folder / "stdout.log", "a") as log:
        log.write(f"\n=== call at {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"
                  f"{' (resumed)' if resumed else ''}\n")
        log.flush()
        proc = subprocess.Popen(_command(row, folder, extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        killed = _wait(proc, kill_at)
    rc = proc.returncode
    outcome = ("finished" if rc == 0 and (folder / "summary.json").exists() else "killed" if killed
               else "interrupted" if rc == INTERRUPTED_EXIT else "failed")
    rec = record(folder)
    rec["calls"].append({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         "device": device_name(), "commit": os.environ.get("UGT_COMMIT") or None,
                         "resumed": resumed, "minutes": round((time.time() - started) / 60, 2), "rc": rc,
                         "outcome": outcome})
    (folder / "bench.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] {row.name}: {outcome} (rc={rc}) in {(time.time() - started) / 60:.1f} min",
          flush=True)
    return outcome


def _wait(proc: subprocess.Popen, kill_at: float | None) -> bool:
    """Wait for ``proc``; past ``kill_at`` stop its process group (TERM, then KILL). Returns whether it was killed."""
    try:
        proc.wait(timeout=None if kill_at is None else max(0.0, kill_at - time.time()))
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return True


def run_rows(rows: list[Row], runs_dir: Path, parallel: int, deadline_s: float | None, reserve_s: float,
             extra: list[str], pack_mib: float = float("inf")) -> dict[str, str]:
    """Run every unfinished row, ``parallel`` at a time, resumable ones first; within ``deadline_s`` seconds
    (rows stop training ``reserve_s`` before it, to evaluate and exit; no row starts after that). With a deadline,
    the rows running at once never hold more resume state (``Row.resume_mib``) than ``pack_mib``: what is still
    running at the end must fit in what the next call carries."""
    start = time.time()
    end = start + deadline_s if deadline_s else None
    todo = [r for r in rows if status(runs_dir / r.name)["state"] != "done"]
    todo.sort(key=lambda r: status(runs_dir / r.name)["state"] != "resumable")
    outcomes: dict[str, str] = {}
    room = threading.Condition()
    held = [0.0]  # resume MiB of the rows running now

    def one(row: Row) -> None:
        need = row.resume_mib if end is not None else 0.0
        with room:  # wait for carry room (the first row always gets it)
            room.wait_for(lambda: held[0] == 0 or held[0] + need <= pack_mib
                          or (end is not None and time.time() > end - reserve_s), timeout=None if end is None
                          else max(0.0, end - reserve_s - time.time()))
            late = end is not None and time.time() > end - reserve_s
            if not late:
                held[0] += need
        if late:  # its deadline has passed: the next call starts it
            outcome = "not started (call ending)"
        else:
            outcome = launch(row, runs_dir, extra, end - reserve_s if end else None, end - 5 if end else None)
            with room:
                held[0] -= need
                room.notify_all()
        with room:
            outcomes[row.name] = outcome

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, todo))
    return outcomes


def slim_moments(path: Path) -> None:
    """Rewrite a resume file with its AdamW moments in bf16 (weights and the best weights stay fp32).

    Why: the next call carries every row's last.pt in a 64 MiB tree; a UGT row's is 18 MiB, half of it the
    moments, so only two UGT rows fit a call. In bf16 (relative rounding <= 2**-8) three do. The resumed optimizer
    casts them back to fp32 (torch's ``Optimizer.load_state_dict`` casts state to each parameter's dtype), so a
    row resumed across calls follows its uninterrupted run up to that rounding, not bit for bit; bench.json counts
    the calls at which it happened (``moments_bf16``)."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("optimizer_format", "torch") != "torch":
        return
    slimmed = False
    for state in ckpt.get("optimizer", {}).get("state", {}).values():
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                state[key] = value.to(torch.bfloat16)
                slimmed = True
    if not slimmed:
        return
    partial = path.with_name(path.name + ".partial")
    torch.save(ckpt, partial)
    partial.replace(path)
    rec = record(path.parent)
    rec.setdefault("moments_bf16", []).append(len(rec["calls"]))
    (path.parent / "bench.json").write_text(json.dumps(rec, indent=2) + "\n")


def pack(runs_dir: Path, out_dir: Path, budget_mib: float) -> list[Path]:
    """Tar + gzip the runs folder (no best checkpoints) into parts of at most 15 MiB under ``out_dir``.

    Over ``budget_mib`` (what the next call can carry), the resume files of the least advanced rows are left out
    (those rows restart); bench.json says so."""
    files = sorted(p for p in runs_dir.rglob("*") if p.is_file() and p.name not in SKIP_IN_PACK)
    for path in files:
        if path.name == "last.pt":
            slim_moments(path)
    resume = sorted((p for p in files if p.name == "last.pt"), key=lambda p: status(p.parent)["epoch"] or 0)
    total = sum(p.stat().st_size for p in files)
    while resume and total > budget_mib * 2**20:
        dropped = resume.pop(0)
        files.remove(dropped)
        total -= dropped.stat().st_size
        rec = record(dropped.parent)
        rec.setdefault("dropped_resume", []).append(len(rec["calls"]))
        (dropped.parent / "bench.json").write_text(json.dumps(rec, indent=2) + "\n")
        print(f"pack: {dropped.parent.name}'s last.pt left out (over {budget_mib} MiB): it restarts")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(runs_dir.parent)))
    data = buffer.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, max(1, len(data)), PART_BYTES):
        part = out_dir / f"{runs_dir.name}.tgz.{i // PART_BYTES:02d}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part)
    print(f"pack: {len(files)} files, {len(data) / 2**20:.1f} MiB in {len(parts)} part(s) under {out_dir}")
    return parts


def unpack(parts_dir: Path, runs_dir: Path) -> None:
    """Restore the runs folder from the parts ``pack`` wrote (a device call's returned files): the folder is
    replaced by the packed one, so what the last call saw is what the next one resumes."""
    parts = sorted(parts_dir.glob(f"{runs_dir.name}.tgz.[0-9][0-9]"))
    if not parts:
        raise SystemExit(f"no {runs_dir.name}.tgz.NN parts in {parts_dir}")
    data = b"".join(p.read_bytes() for p in parts)
    staging = runs_dir.with_name(runs_dir.name + ".unpacking")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(staging, filter="data")
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    (staging / runs_dir.name).rename(runs_dir)
    staging.rmdir()
    print(f"unpack: {len(parts)} part(s), {len(data) / 2**20:.1f} MiB -> {runs_dir}")
