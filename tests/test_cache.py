"""The persistent compile cache: a later process loads the programs an earlier one compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from lancet import enable_compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = enable_compile_cache()
jax.jit(lambda x: jnp.tanh(x) * 3 + 1)(jnp.ones((4, 5))).block_until_ready()
print(json.dumps({"folder": folder and str(folder), "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def run_program(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def clean_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "LANCET_COMPILE"))}
    return {**env, "LANCET_CACHE": str(tmp_path), **extra}


def test_second_process_loads_compiled_programs(tmp_path):
    first = run_program(clean_env(tmp_path))
    assert first == {"folder": str(tmp_path / "xla"), "hits": 0}
    assert any((tmp_path / "xla").iterdir())
    second = run_program(clean_env(tmp_path))
    assert second["hits"] >= 1


def test_compile_cache_can_be_turned_off(tmp_path):
    result = run_program(clean_env(tmp_path, LANCET_COMPILE_CACHE="off"))
    assert result == {"folder": None, "hits": 0}
    assert not (tmp_path / "xla").exists()


def test_cli_fills_the_cache(tmp_path, backdoor_case):
    subprocess.run([sys.executable, "-m", "lancet.cli", "eval", str(backdoor_case.model), "--data",
                    str(backdoor_case.case), "--backend", "jax", "--json"], env=clean_env(tmp_path),
                   capture_output=True, check=True)
    assert len(list((tmp_path / "xla").iterdir())) >= 1
