"""Process-wide settings of the fedunroll entry points (CLI, ClientApp, ServerApp): the torch
device, the allocator.

glibc's allocator serves blocks above a *dynamic* threshold (128 KiB at start) with fresh
``mmap`` pages and unmaps them on free, so a training step that allocates and frees megabyte-sized
k-space and activation tensors page-faults on every one of them. Measured on the 2-core CPU
machine (``benchmarks/bench_modl.py``, MoDL Nu=6, NCG=6, 128x128, 8 coils): the FFT floor goes
from 70-80 ms to 23 ms and a forward pass from 171-214 ms to 112-122 ms once large blocks stay on
the heap. :func:`tune_malloc` does that for the current process (``mallopt``) and, through the
``MALLOC_*_`` environment variables, for the processes it starts (SuperLink, Ray workers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed heap (mallopt takes an int)
ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
OPT_OUT = "FEDUNROLL_MALLOC_TUNING"  # "0": leave the allocator alone


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; a CUDA request without CUDA is a
    ``ValueError``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return name


def tune_malloc() -> bool:
    """Keep blocks up to 32 MiB on the heap (glibc only); True if the setting was applied.

    A no-op when ``FEDUNROLL_MALLOC_TUNING=0``, off Linux / glibc, or when the environment
    already sets ``MALLOC_MMAP_THRESHOLD_`` (a user's or a benchmark's own choice wins).
    """
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if ok:
        for key, value in ENV.items():
            os.environ.setdefault(key, value)
    return ok
