"""Shared benchmark helpers: timing, environment facts, JSON output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
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


def code_revision() -> str | None:
    """The checkout's commit (`git describe --always --dirty`), so a figure names the code that made it.

    None outside a git checkout (an installed copy): the figure then carries the package version only.
    """
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (described.stdout.strip() or None) if described.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name and widest vector extension: torch's CPU kernels differ between AVX2 and AVX-512,
    and so do the models a recipe trains on them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{names[0] if names else platform.machine()} ({vector})"


def environment() -> dict:
    """Machine, library and code facts stored next to every figure."""
    import jax
    import onnxruntime

    import lancet

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "onnxruntime": onnxruntime.__version__,
            "devices": [str(d) for d in jax.devices()], "lancet": lancet.__version__, "code": code_revision(),
            "cpu": cpu_model()}


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
