"""torch.compile of the CPU steps: one compiled graph per step for every batch size, per engine.

On CPU a served batch is hundreds of small ops whose dispatch costs more than their arithmetic; inductor fuses
them, and its C++ wrapper launches the kernels without Python (measured: docs/SERVING.md).
"""

from __future__ import annotations

import shutil
import types

import torch


def own_code(method):
    """``method`` rebound to a copy of its function with its own code object.

    torch.compile keeps compiled graphs per code object, so every engine would otherwise share one cache: a
    second model in the process (the router serves several) would recompile the first one's steps, and with
    only tensor guards kept (see :func:`compile_step`) could even reuse a graph built for another model's sizes.
    """
    f = method.__func__
    fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    fresh.__kwdefaults__, fresh.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(fresh, method.__self__)


def check_can_compile(device: torch.device) -> None:
    """A clear error at start instead of a failure on the first request."""
    if device.type != "cpu":
        raise ValueError("compile is for the CPU path; on CUDA, cuda_graphs replay the captured steps instead")
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ValueError("compile needs a C++ compiler on PATH (g++ or clang++; e.g. apt-get install g++)")


def compile_step(method):
    """``method`` (bound) under torch.compile with the C++ wrapper, guarded on its tensor inputs only."""
    import torch._inductor.config as inductor

    inductor.compile_threads = 1  # no compile worker pool: the serving engine is forked after start-up
    # Guards: only the inputs' tensor properties. The rest (weights, cache pools, config ints) is fixed after
    # start-up, and checking it cost ~0.3 ms a call, as much as the compiled decode itself.
    options: dict[str, object] = {"cpp_wrapper": True}
    keep_tensor_guards = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)  # PyTorch 2.8+
    if keep_tensor_guards is not None:
        options["guard_filter_fn"] = keep_tensor_guards
    return torch.compile(own_code(method), options=options)


def batch_dim_dynamic(t: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile that dim 0 (the batch) varies: one graph for every batch size >= 2."""
    torch._dynamo.mark_dynamic(t, 0)
    return t
