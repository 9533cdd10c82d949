"""Shared benchmark helpers: timing, environment facts, JSON output."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable


def best_of(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Best wall time of `repeats` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def environment() -> dict:
    """Machine and library facts stored next to every figure."""
    import jax
    import onnxruntime

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "onnxruntime": onnxruntime.__version__,
            "devices": [str(d) for d in jax.devices()]}


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
