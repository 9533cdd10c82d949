"""The `lancet` command line: JSON for machines, tables for people, exit codes 0 / 2 (bad input) / 3."""
from __future__ import annotations

import json
import sys
import warnings
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click

from .errors import LancetError


def _console():
    from rich.console import Console

    # Wide enough for tensor names when stdout is a pipe or a file (rich would default to 80 columns).
    return Console(width=None if sys.stdout.isatty() else 200)


def handle_errors(fn: Callable) -> Callable:
    """Turn LancetErrors into one line on stderr and their exit code, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                return fn(*args, **kwargs)
        except LancetError as exc:
            click.echo(f"lancet: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except MemoryError:
            click.echo("lancet: error: out of memory; try a smaller batch", err=True)
            sys.exit(1)

    return wrapper


def emit_json(data: dict, path: str | None = None) -> None:
    """Print JSON to stdout, or write it atomically to `path`."""
    text = json.dumps(data, indent=2, default=_json_default)
    if path:
        from .io import write_text_atomic

        write_text_atomic(Path(path), text + "\n")
    else:
        click.echo(text)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-lancet")
def main() -> None:
    """Locate and repair the error-inducing neurons of an ONNX classifier (AI-Lancet)."""


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def inspect(model_path: str, as_json: bool) -> None:
    """List the model's inputs, outputs, layers, neuron and parameter counts, and op coverage."""
    from .errors import UnsupportedOpError
    from .loader import load_model
    from .neurons import summary

    try:
        model = load_model(model_path)
    except UnsupportedOpError as exc:
        if as_json:
            emit_json({"path": model_path, "supported": False, "unsupported_ops": exc.unsupported})
        raise
    info = summary(model)
    info["supported"] = True
    if as_json:
        emit_json(info)
        return
    from .report import inspect_tables

    inspect_tables(info, _console())


@main.command("eval")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="The case .npz file.")
@click.option("--backend", type=click.Choice(["ort", "jax"]), default="ort", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def eval_command(model_path: str, data_path: str, backend: str, as_json: bool) -> None:
    """Accuracy on the case's clean and error sets."""
    from .case import load_case
    from .evaluate import evaluate_case, make_predictor
    from .loader import load_model

    model = load_model(model_path)
    case = load_case(data_path, model)
    result = {"model": model_path, "data": data_path, "backend": backend,
              **evaluate_case(make_predictor(model, backend), case)}
    if as_json:
        emit_json(result)
        return
    from .report import key_value_table

    key_value_table("lancet eval", result, _console())


@main.command()
@handle_errors
def demo() -> None:
    """Build a small backdoored model on real data (cached) and repair it end to end."""
    try:
        from lancet.models.demo import run_demo
    except ImportError as exc:
        raise LancetError(f"the demo trains its model with PyTorch: install the `torch` and `data` extras "
                          f"(pip install 'onnx-lancet[cpu,torch,data]'): {exc}") from exc
    run_demo(_console())


if __name__ == "__main__":  # pragma: no cover
    main()
