"""Which implementation runs a kernel: the Triton kernel or its PyTorch reference.

The rule: Triton when it is importable and every tensor is on a CUDA device, the
reference otherwise. Two overrides, the first that is set wins:

1. ``with use_backend("triton" | "reference" | None):`` for the calls inside the block
   (a context variable: per thread and per asyncio task). ``None`` restores the rule
   above inside the block, ignoring the environment.
2. The environment variable ``VSTREAM_KERNELS=triton|reference`` for the whole process.

Forcing ``"triton"`` on CPU tensors runs the kernels in Triton's interpreter; it needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported (the tests
do this). Where triton is not installed (macOS, Windows) every call takes the
reference, whatever the override says.

Triton is imported here, once, guarded: the kernel files take ``triton`` and ``tl``
from this module, and where triton is missing these are stand-ins under which the
``@triton.jit`` functions are defined as plain functions that are never launched.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vstream.errors import KernelError

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: the references serve every call

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` so kernel files import."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    HAS_TRITON = False

BACKENDS = ("triton", "reference")
ENV_VAR = "VSTREAM_KERNELS"

_UNSET = "unset"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vstream_kernels_backend", default=_UNSET
)


def _checked(name: str | None, where: str) -> str | None:
    if name is not None and name not in BACKENDS:
        known = ", ".join(repr(b) for b in BACKENDS)
        raise KernelError(f"{where}: unknown kernel backend {name!r}; known: {known} (or None)")
    return name


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the kernel calls inside the block on backend ``name``: ``"triton"``,
    ``"reference"``, or ``None`` for the automatic choice. Nests; restores on exit."""
    token = _override.set(_checked(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend_for(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: the backend a kernel call on ``tensors`` takes.

    Raises ``KernelError`` for an unknown name in ``VSTREAM_KERNELS``, and when
    ``"triton"`` is forced on CPU tensors without ``TRITON_INTERPRET=1``."""
    choice = _override.get()
    if choice == _UNSET:
        choice = _checked(os.environ.get(ENV_VAR) or None, f"environment variable {ENV_VAR}")
    if not HAS_TRITON:
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if choice is None:
        return "triton" if on_cuda else "reference"
    if choice == "triton" and not on_cuda and not _interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise KernelError(
            f"backend 'triton' was forced on tensors on {', '.join(devices)}: it needs CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported"
        )
    return choice


def check_tensor(name: str, t: object, ranks: tuple[int, ...], floating: bool = True) -> None:
    """Refuse ``t`` unless it is a tensor of one of ``ranks`` and, when ``floating``, of
    a dtype the kernels take (float32, float16, bfloat16)."""
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-d" for r in ranks)
        raise KernelError(f"{name}: expected a {want} tensor, got shape {list(t.shape)}")
    if floating and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Refuse tensors that sit on different devices, naming each one's device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise KernelError(f"expected all tensors on one device, got {where}")
