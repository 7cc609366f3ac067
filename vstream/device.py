"""Where a stage runs: ``"auto"`` (CUDA when torch sees it, else the CPU), ``"cpu"``,
``"cuda"`` or ``"cuda:N"``; and in what precision: ``"auto"`` (float16 on CUDA, float32
on the CPU), ``"float32"``, ``"float16"`` or ``"bfloat16"``. The model, the frame
encoder and the memory each take these, so ``--device`` moves a whole session.
Configs check their specs without importing torch."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("float32", "float16", "bfloat16")


def check_device(owner: str, spec: object) -> None:
    """Refuse a device spec that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not (isinstance(spec, str) and DEVICES.fullmatch(spec)):
        raise ConfigError(f"{owner} must be one of auto, cpu, cuda, cuda:N; got {spec!r}")


def resolve_device(spec: str | torch.device | None = "auto", owner: str = "device") -> torch.device:
    """The ``torch.device`` for ``spec`` (None: ``"auto"``); a clear error when CUDA is
    asked for and this torch has none, or not that many devices."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec
    check_device(owner, spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"{owner} is {spec!r} but torch sees no CUDA device (torch {torch.__version__}, "
                              f"{build}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{owner} is {spec!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, owner: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` for ``spec`` on ``device`` (None or ``"auto"``: float16 on CUDA,
    float32 on the CPU)."""
    import torch

    if spec is None or spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(spec, torch.dtype) and str(spec).removeprefix("torch.") in DTYPES:
        return spec
    if isinstance(spec, str) and spec in DTYPES:
        return getattr(torch, spec)
    raise ConfigError(f"{owner} must be one of auto, {', '.join(DTYPES)}; got {spec!r}")
