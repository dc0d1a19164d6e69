"""`ugt train` under torchrun: the process group, per-rank batches, gradient sync, decisions made on rank 0.

Why this shape (nanoGPT's train.py, with the global batch kept fixed): ``batch_size`` in a config is the *global*
batch of one optimizer step, whatever the world size. Each step's rows (one shuffle of the training split, from the
run's numpy RNG, which every rank holds in the same state and checkpoints save) are dealt to the ranks
(``rows[rank::world]``) and then into ``grad_accum`` micro-batches. Each micro-batch's mean loss is weighted by its
share of the step's targets (``n_micro * world / n_step``), so DDP's gradient average over ranks plus the sum over
micro-batches is the gradient of the step's mean loss, as one process computes it: the run is the same at any world
size, a checkpoint resumes at another one, and a world of one with ``grad_accum: 1`` is today's loop exactly (every
weight is 1.0).

Rank 0 evaluates, logs, writes checkpoints and decides whether to stop (patience, ``max_minutes``, the deadline);
:meth:`DistEnv.broadcast` hands its decision to the others, so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.data import Batchable
from models.train_config import pick_device

KINDS = ("ddp", "fsdp")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer (torchrun sets it), got {value!r}") from None


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank, world size, local rank (its GPU), and how the model is wrapped."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    kind: str = "ddp"  # ddp | fsdp (TrainConfig.distributed)
    owns_group: bool = False  # this run started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, value: float) -> float:
        """The sum of ``value`` over the ranks (float64 on CPU: gloo and NCCL both reduce it)."""
        if not self.active:
            return value
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a picklable object)."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def setup(kind: str, device_name: str) -> tuple[DistEnv, torch.device]:
    """The run's :class:`DistEnv` and device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    A world of one (plain `ugt train`) starts nothing. Otherwise: NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``,
    NVLink multicast left off: ``NCCL_NVLS_ENABLE=0`` unless the caller set it), gloo on CPU.
    """
    if kind not in KINDS:
        raise ValueError(f"distributed must be one of {KINDS}, got {kind!r}")
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    device = pick_device(device_name)
    if world <= 1:
        return DistEnv(kind=kind), device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    owns = not dist.is_initialized()
    if owns:  # rank 0 validates while the others wait at the broadcast: allow it an hour, not NCCL's 10 minutes
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return DistEnv(rank, world, local, kind, owns), device


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """``module`` (the step's loss, its model inside) for this world: as it is alone, DDP or FSDP2 otherwise.

    DDP finds unused parameters: an MoE expert no token picked, or a head a step does not reach, has no gradient.
    """
    if not env.active:
        return module
    if env.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(module, "inner", module), "layers", []):
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    own = [name for name, p in module.named_parameters() if getattr(p, "sharded_rows", False)]  # a rank's own rows
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, own)
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: backward passes sync gradients across ranks only when ``enabled`` (the step's last micro-batch)."""
    if enabled or not isinstance(module, torch.nn.Module):
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


Micro = tuple[dict[str, np.ndarray], float]  # one micro-batch of this rank and its loss weight


def step_batches(split: Batchable, batch_size: int, grad_accum: int, env: DistEnv,
                 rng: np.random.Generator) -> Iterator[list[Micro]]:
    """Per optimizer step, this rank's ``grad_accum`` micro-batches and their loss weights.

    The shuffle is the one :func:`models.data.iterate_batches` makes (same RNG use), so a world of one sees
    today's batches. A rank left without rows in a micro-batch (the epoch's last, short step) runs one row at weight
    0: every rank must run the same backward passes for the gradient sync.
    """
    index = np.arange(len(split))
    rng.shuffle(index)
    counts = (split.targets > 0).sum(axis=1) if split.targets.ndim == 2 else np.ones(len(split), dtype=np.int64)
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        total = int(counts[chunk].sum())
        micro: list[Micro] = []
        for part in np.array_split(chunk[env.rank :: env.world_size], grad_accum):
            if len(part) == 0 or total == 0:
                micro.append((split.rows(chunk[:1]), 0.0))
            else:
                micro.append((split.rows(part), int(counts[part].sum()) * env.world_size / total))
        yield micro


# ---- RNG states: what a resume restores on each rank ---------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's torch RNG states (CPU, and its GPU's)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(saved: dict[str, Any], env: DistEnv, device: torch.device, seed: int, epoch: int) -> None:
    """Set this rank's torch RNGs from a last.pt's ``resume`` entry.

    Each rank takes its own saved state (``rank_rngs``, written at any world size); a rank the saved run did not
    have starts from a seed of (seed, epoch, rank). Older files hold rank 0's alone (``torch_rng``/``cuda_rng``).
    """
    ranks = saved.get("rank_rngs") or []
    if env.rank < len(ranks):
        torch.set_rng_state(ranks[env.rank]["torch"].cpu())
        if ranks[env.rank].get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ranks[env.rank]["cuda"].cpu(), device)
    elif env.main:
        torch.set_rng_state(saved["torch_rng"].cpu())
        if saved.get("cuda_rng") and device.type == "cuda":
            torch.cuda.set_rng_state_all([t.cpu() for t in saved["cuda_rng"]])
    else:
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, env.rank]).generate_state(1)[0]))


# ---- FSDP: whole weights and optimizer state from the shards (every rank calls these) ----------------------


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP-wrapped module, on CPU, on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """The optimizer state a checkpoint keeps: torch's own format, or under FSDP the whole state keyed by
    parameter name (rank 0; gathered from every rank's shard)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _param_names(module: torch.nn.Module) -> list[str]:
    """Parameter names in optimizer order, as FSDP's state dicts name them (no DDP ``module.``, no ``_orig_mod.``)."""
    return [name.removeprefix("module.").replace("_orig_mod.", "") for name, _ in module.named_parameters()]


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fmt: str | None) -> None:
    """Restore a checkpoint's optimizer state into this run's wrapping, whichever wrote it: torch's format (one
    process, DDP) and the name-keyed one (FSDP) map onto each other by parameter name."""
    names = _param_names(module)
    sharded = hasattr(module, "set_requires_gradient_sync")
    if fmt == "fqn" and not sharded:
        index = {name: i for i, name in enumerate(names)}
        state = {"state": {index[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]]}
    elif fmt != "fqn" and sharded:
        state = {"state": {names[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in state["param_groups"]]}
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
