"""Which backend runs an op, decided once per call and in one place.

Backends (DESIGN.md):

=========== ===================================================================
``triton``  Triton kernels: CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``
``cuda``    the C++/CUDA extension ``fastvit_kernels._C`` (fallback when Triton is missing or fails)
``cpu``     the C++ extension on CPU tensors (same math headers as ``cuda``)
``reference`` plain PyTorch, runs anywhere; the specification the others are tested against
=========== ===================================================================

With no preference, a call takes the first backend in ``DEFAULT_ORDER[device type]`` that can serve its
input. A preference is set by ``FASTVIT_KERNELS_BACKEND=<name>`` or, taking precedence, the
``use_backend(name)`` context manager. A backend asked for by name that cannot serve an input raises
:class:`BackendUnavailable` saying why; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "FASTVIT_KERNELS_BACKEND"
DEFAULT_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run the op on this input."""


# --------------------------------------------------------------------------------------------------
# What loaded, and why not. Each loader runs once, lazily, so `import fastvit_kernels` never fails.
# --------------------------------------------------------------------------------------------------

_load_errors: Dict[str, Optional[str]] = {}
_modules: Dict[str, object] = {}


def _try_import(key: str, module: str) -> Optional[str]:
    if key not in _load_errors:
        try:
            _modules[key] = importlib.import_module(module)
            _load_errors[key] = None
        except Exception as e:  # ImportError, or a broken install raising anything else
            _load_errors[key] = f"import {module} failed: {type(e).__name__}: {e}"
    return _load_errors[key]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension():
    """The compiled extension module ``fastvit_kernels._C``, or None."""
    return None if _try_import("_C", "fastvit_kernels._C") else _modules["_C"]


def load_error(backend: str) -> Optional[str]:
    """None when ``backend`` loaded on this machine, else the reason it did not."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _try_import("triton", "triton")
    ext_error = _try_import("_C", "fastvit_kernels._C")
    if ext_error:
        return ext_error
    if backend == "cuda":
        if not _modules["_C"].has_cuda():
            return "the extension was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
    return None


def device_error(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on tensors of ``device``, else why not."""
    kind = device.type
    if backend == "reference":
        return None
    if backend == "triton":
        if kind == "cuda" or (kind == "cpu" and triton_interpreting()):
            return None
        return f"tensors on {kind} need CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    if backend != kind:
        return f"the {backend} backend runs {backend} tensors, got a {kind} tensor"
    return None


# --------------------------------------------------------------------------------------------------
# Preference: context manager over environment variable.
# --------------------------------------------------------------------------------------------------

_local = threading.local()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; supported: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (None: automatic choice).

    Example::

        with fastvit_kernels.use_backend("reference"):
            y = model(x)
    """
    if name is not None:
        _check_name(name, "use_backend(name)")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend() -> Optional[str]:
    """The backend the caller asked for, or None for the automatic choice."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, f"environment variable {ENV_VAR}") if env else None


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    ``run(*args)`` does the work; ``unsupported(*args)`` returns None when it can, else a short reason
    (dtype, kernel size...). Device and load checks are done here, not by each op.
    """

    backend: str
    run: Callable
    unsupported: Callable[..., Optional[str]] = lambda *args: None


_warned_fallback: set = set()


def why_not(impl: Implementation, device: torch.device, *args) -> Optional[str]:
    return load_error(impl.backend) or device_error(impl.backend, device) or impl.unsupported(*args)


def run(op: str, impls: Sequence[Implementation], device: torch.device, *args):
    """Run ``op`` on the requested backend, or on the first one in the default order that fits."""
    by_name = {impl.backend: impl for impl in impls}
    name = requested_backend()
    if name is not None:
        impl = by_name.get(name)
        reason = why_not(impl, device, *args) if impl else f"{op} has no {name} implementation"
        if reason:
            raise BackendUnavailable(f"backend {name!r} cannot run {op}: {reason}")
        return impl.run(*args)

    # Lazily: the first backend that fits runs; the next one is only looked for if Triton fails.
    order = DEFAULT_ORDER.get(device.type, ("reference",))
    candidates = (by_name[b] for b in order if b in by_name and why_not(by_name[b], device, *args) is None)
    first = next(candidates, None)
    if first is None:
        raise BackendUnavailable(f"no backend can run {op} on {device.type} tensors")
    if first.backend != "triton":
        return first.run(*args)
    try:
        return first.run(*args)
    except Exception as e:  # a Triton compile failure on an unusual GPU: the C++ kernel serves, loudly
        fallback = next(candidates, None)
        if fallback is None:
            raise
        key = (op, type(e).__name__)
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            warnings.warn(f"fastvit_kernels: triton backend failed for {op} ({e!r}); "
                          f"falling back to {fallback.backend}")
        return fallback.run(*args)


# --------------------------------------------------------------------------------------------------
# Eager inference without the dispatcher
# --------------------------------------------------------------------------------------------------

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call(*tensors: Optional[torch.Tensor]) -> bool:
    """True when an op may call its implementation directly instead of through its torch.library op.

    Going through the dispatcher costs about 0.1 ms per call on the CPU (more than a small fused
    kernel takes; EdgeNeXt-XXS makes ~45 such calls per image batch). It is only needed when
    something must see the op: autograd (a tensor needs grad), torch.compile / export / FX, tensor
    subclasses (FakeTensor), dispatch modes and functorch transforms. In plain eager inference none
    of them is there, and the direct call runs the same checks and the same backend choice.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return True
