"""Where lancet keeps what it reuses between runs, and the persistent cache of XLA-compiled programs.

Compiling dominates small models: the demo's LeNet repair spends most of its cached run compiling the
forward, the valuation and the ablation search, and every run compiles the same programs again. With
`enable_compile_cache()` JAX stores each compiled program on disk, keyed by the program itself, the JAX
version, the backend and the compiler flags, and a later run (or another jit of the same program in this
run) loads it instead. The CLI turns it on; the Python API leaves JAX's configuration to the caller.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LANCET_CACHE"                  # root folder (default ~/.cache/onnx-lancet)
COMPILE_CACHE_ENV = "LANCET_COMPILE_CACHE"  # 'off' / '0' / 'false': no compile cache; a path: that folder
COMPILE_CACHE_MAX_BYTES = 1 << 30           # least recently used programs are evicted beyond this
MIN_COMPILE_SECONDS = 0.0                   # keep every program: LeNet's are small and there are many


def cache_root() -> Path:
    """The folder lancet caches in: $LANCET_CACHE, default ~/.cache/onnx-lancet (created)."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "onnx-lancet"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def enable_compile_cache(path: str | Path | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in `path` (default: $LANCET_COMPILE_CACHE, else
    `cache_root()/xla`); return the folder in use, or None when $LANCET_COMPILE_CACHE is 'off'.

    A cache folder the user already gave JAX (JAX_COMPILATION_CACHE_DIR) is kept as it is. The folder
    is bounded: beyond COMPILE_CACHE_MAX_BYTES the least recently used programs are evicted.
    """
    import jax

    setting = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    existing = jax.config.jax_compilation_cache_dir
    if existing and path is None:
        return Path(existing)
    folder = Path(path or setting or cache_root() / "xla")
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # JAX evicts under a file lock; without the package the cache stays unbounded
        import filelock  # noqa: F401

        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    except ImportError:
        pass
    return folder
