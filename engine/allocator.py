"""glibc malloc settings for XLA's CPU runtime: keep its per-call buffers in the heap.

XLA on CPU allocates a computation's temporaries as one buffer per call (MobileNetV2-small's forward at 64
inputs: 34 MB; its weight gradient: 508 MB; ResNet-18's forward: 91 MB). glibc serves allocations above its
mmap threshold (at most 32 MB by its dynamic rule) with a fresh mmap, so every call page-faults the whole
buffer in again, and trims freed heap memory back to the system. With both thresholds at 128 MiB the forward's
buffer is reused from the heap: MobileNetV2-small's forward 27-30 -> 17-18 ms in fresh processes; in
benchmarks/forward.py (one process per model) 6.0x -> 3.9-4.3x onnxruntime's time over four runs, its input
gradient 71 -> 50-53 ms. The cost is memory the
process keeps: the ResNet-18 locate benchmark's peak RSS 691 -> 801 MB (1,078 MB at 1 GiB thresholds, which
sped up nothing more: gradient buffers of up to 508 MB were no faster from the heap).
Set LANCET_MALLOC_TUNING=0 to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
HEAP_BYTES = 128 << 20  # both thresholds

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds to HEAP_BYTES once per process (glibc on Linux only, unless
    LANCET_MALLOC_TUNING=0); True when the settings are in place."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if os.environ.get("LANCET_MALLOC_TUNING", "1") != "0" and platform.system() == "Linux" \
                and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            _tuned = bool(mallopt(M_MMAP_THRESHOLD, HEAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_BYTES))
    return _tuned
