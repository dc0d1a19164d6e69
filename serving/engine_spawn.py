"""The engine of `ugt serve --workers N` for a model on CUDA: a fresh (spawned) process, not a fork.

CUDA does not survive a fork, so the forked engine of serving/supervisor.py can only serve CPU models. For a CUDA
model the supervisor composes its own copy of the service on the CPU (``device: cpu``: it checks the config and
the checkpoint, and the forked HTTP workers never run a model), and starts the engine with multiprocessing's
``spawn``: a new interpreter that composes the service again from the same settings and config, with the model
on the GPU (weights, KV cache, CUDA graphs captured there), then runs the same engine loop as a forked one
(:func:`serving.compose.engine_main`) on the workers' Unix socket. A replacement engine is spawned the same way,
so it takes the model's load time (seconds) before it answers; the workers answer with the marked fallback
meanwhile, as when any engine dies. It is started as ``python -m serving.engine_spawn`` with its arguments pickled
on stdin (not through multiprocessing, whose spawn also starts a resource-tracker process the supervisor would
have to tell apart from its roles).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys

from infra.settings import Settings
from serving.config import ServingConfig

log = logging.getLogger(__name__)


def wants_spawn(config: ServingConfig) -> bool:
    """``engine_start``, or for auto: True when a UGT model of this config would run on CUDA here (it must be)."""
    if config.engine_start != "auto":
        return config.engine_start == "spawn"
    if config.device == "cpu":
        return False
    uses_ugt = config.generator == "ugt" or any(d.generator == "ugt" for d in config.domains) or any(
        arm.generator == "ugt" for e in config.experiments for arm in e.arms)
    if not uses_ugt:
        return False
    if config.device == "cuda":
        return True
    import torch

    return torch.cuda.is_available()


def on_cpu(config: ServingConfig) -> ServingConfig:
    """The config the supervisor composes its own copy with: models on the CPU, so its children can be forked,
    and a one-user KV cache (the copy only checks the checkpoint and config; it never serves a batch). What only a
    GPU engine runs (paged attention, fp8) is left to the spawned engine to check."""
    return dataclasses.replace(config, device="cpu", kv_cache_users=min(config.kv_cache_users, 1), kv_cache_bytes=0,
                               paged_attention=False, quantize="none" if config.quantize == "fp8" else config.quantize)


def _spawned_main(settings: Settings, config: ServingConfig, restarts: int, path: str, parent_pid: int,
                  log_level: int) -> None:
    """In the spawned engine: compose the service (model on the GPU), then serve the workers until told to stop."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the supervisor stops us
    from serving.compose import compose, engine_main

    # the engine kind (thread / process) is the HTTP process's choice; here the engine loop itself runs
    runtime = compose(settings, dataclasses.replace(config, engine="auto"), batcher=False)
    engine_main(runtime, restarts, path=path, parent_pid=parent_pid)


def spawn_engine(settings: Settings, config: ServingConfig, restarts: int, path: str,
                 parent_pid: int) -> subprocess.Popen:
    """Start a spawned engine process; the supervisor reaps it with os.wait like its forked children."""
    process = subprocess.Popen([sys.executable, "-m", "serving.engine_spawn"], stdin=subprocess.PIPE,
                               cwd=os.getcwd())
    assert process.stdin is not None
    level = logging.getLogger().getEffectiveLevel()
    process.stdin.write(pickle.dumps((settings, config, restarts, path, parent_pid, level)))
    process.stdin.close()
    return process


if __name__ == "__main__":
    _spawned_main(*pickle.loads(sys.stdin.buffer.read()))
