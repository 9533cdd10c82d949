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


def emit_report(report: dict, report_path: str | None, as_json: bool, tables: Callable[[dict, Any], None]) -> None:
    """Write the JSON report to `report_path` if given; print it as JSON or as readable tables."""
    if report_path:
        emit_json(report, report_path)
    if as_json:
        emit_json(report)
    else:
        tables(report, _console())


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
    """Locate and repair the error-inducing neurons of an ONNX classifier (AI-Lancet).

    Compiled programs are kept in a disk cache ($LANCET_CACHE/xla) for later runs; LANCET_COMPILE_CACHE=off
    turns that off.
    """
    from .cache import enable_compile_cache

    try:
        enable_compile_cache()
    except OSError as exc:  # an unwritable cache folder costs speed, not the run
        click.echo(f"lancet: note: no compile cache ({exc})", err=True)


output_option = click.option(
    "--output", "output_name", metavar="NAME", default=None,
    help="The graph output holding the class scores (default: the first float output; a predicted-label "
         "output beside them is skipped).")


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@output_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def inspect(model_path: str, output_name: str | None, as_json: bool) -> None:
    """List the model's inputs, outputs, layers, neuron and parameter counts, and op coverage."""
    from .errors import UnsupportedOpError
    from .loader import load_model
    from .neurons import summary

    try:
        model = load_model(model_path, output=output_name)
    except UnsupportedOpError as exc:
        if as_json:
            emit_json({"path": model_path, "supported": False, "unsupported_ops": exc.unsupported})
        raise
    info = summary(model)
    from .loader import external_data_files

    info["external_data"] = [{"file": str(path), "bytes": path.stat().st_size}
                             for path in external_data_files(model_path)]
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
@output_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def eval_command(model_path: str, data_path: str, backend: str, output_name: str | None, as_json: bool) -> None:
    """Accuracy on the case's clean and error sets."""
    from .case import load_case
    from .evaluate import evaluate_case, make_predictor
    from .loader import load_model

    model = load_model(model_path, output=output_name)
    case = load_case(data_path, model)
    result = {"model": model_path, "data": data_path, "backend": backend, "scores_output": model.output.name,
              **evaluate_case(make_predictor(model, backend), case)}
    if as_json:
        emit_json(result)
        return
    from .report import key_value_table

    key_value_table("lancet eval", result, _console())


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="The case .npz file.")
@click.option("--granularity", type=click.Choice(["weight", "channel"]), default="weight", show_default=True)
@click.option("--target-fix", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Share of the pairs' error inputs that must lose the wrong label.")
@click.option("--max-acc-drop", type=click.FloatRange(0, 100), default=2.0, show_default=True,
              help="Largest clean-accuracy drop (points) an EIN set may cause.")
@click.option("--fill", type=click.Choice(["median", "inpaint"]), default="median", show_default=True,
              help="How a trigger region is refilled to build companions.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write the ablation curve PNG here (clean accuracy is then evaluated at every k tried).")
@click.option("--mask-png", "mask_path", type=click.Path(dir_okay=False),
              help="Write the restored trigger mask PNG here (cases without x_error).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--peel", "peel", type=click.IntRange(0), default=0, show_default=True,
              help="Clean data only: after restoring the trigger, restore up to N further parts of it per flagged "
                   "class with the pixels found so far forbidden, and train on their union too. Off by default: on "
                   "the repair benchmark it fixed a GRU the plain restoration did not and cost an int4 ViT 19 "
                   "points (README).")
@output_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
@handle_errors
def locate(model_path, data_path, granularity, target_fix, max_acc_drop, fill, report_path, plot_path, mask_path,
           seed, peel, output_name, as_json) -> None:
    """Find the error-inducing neurons: pairs, EI features, scores, progressive ablation."""
    from .io import check_output_path
    from .locate.pipeline import locate as run_locate
    from .locate.pipeline import plot_curve

    for path in (report_path, plot_path, mask_path):
        if path:
            check_output_path(Path(path), inputs=(Path(model_path), Path(data_path)))
    if plot_path or mask_path:
        _require_matplotlib()
    result = run_locate(model_path, data_path, granularity=granularity, target_fix=target_fix,
                        max_acc_drop=max_acc_drop, fill=fill, seed=seed, progress=not as_json,
                        full_curve=bool(plot_path), output=output_name, restore_peel=peel)
    report = result.to_json()
    if plot_path:
        plot_curve(result, plot_path)
        report["plot"] = plot_path
    if mask_path and result.restore is not None:
        from .locate.restore import save_mask_png

        save_mask_png(result.restore, mask_path)
        report["mask_png"] = mask_path
    from .report import locate_tables

    emit_report(report, report_path, as_json, locate_tables)


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="The case .npz file.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The repaired ONNX file.")
@click.option("--method", type=click.Choice(["finetune", "flip"]), default="finetune", show_default=True,
              help="finetune trains the EINs on the defender's data (meets the held-out goal far more often: "
                   "docs/repair-benchmark.md); flip negates them, faster, often at a larger accuracy cost.")
@click.option("--granularity", type=click.Choice(["weight", "channel"]), default="weight", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG here: per-class accuracy before/after, and the fine-tuning run or flip options.")
@click.option("--max-acc-drop", type=click.FloatRange(0, 100), default=2.0, show_default=True,
              help="Largest clean-accuracy drop (points) accepted.")
@click.option("--max-class-drop", type=click.FloatRange(0, 100), default=None,
              help="Largest accuracy drop (points) accepted on any one class of x_clean (default: no bound).")
@click.option("--target-fix", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Smallest error-fix rate accepted.")
@click.option("--candidates", type=click.IntRange(1), default=None,
              help="Fine-tuning: the most candidate sets trained per size (the search's set, then the deepest "
                   "layers' sets; default: every one the repair tries); 1 trains the search's set alone, "
                   "fastest.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write the repaired model even when it misses the bounds.")
@click.option("--peel", "peel", type=click.IntRange(0), default=0, show_default=True,
              help="Clean data only: after restoring the trigger, restore up to N further parts of it per flagged "
                   "class with the pixels found so far forbidden, and train on their union too. Off by default: on "
                   "the repair benchmark it fixed a GRU the plain restoration did not and cost an int4 ViT 19 "
                   "points (README).")
@output_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
@handle_errors
def repair(model_path, data_path, out_path, method, granularity, report_path, plot_path, max_acc_drop, max_class_drop,
           target_fix, candidates, seed, force, peel, output_name, as_json) -> None:
    """Locate the EINs, fix them (flip or fine-tune), export the repaired ONNX file, compare before/after."""
    from .io import check_output_path
    from .repair import repair as run_repair

    for path in (report_path, plot_path):
        if path:
            check_output_path(Path(path), inputs=(Path(model_path), Path(data_path)))
    if plot_path:
        _require_matplotlib()
    result = run_repair(model_path, data_path, out_path, method=method, granularity=granularity,
                        max_acc_drop=max_acc_drop, max_class_drop=max_class_drop, target_fix=target_fix,
                        seed=seed, force=force, progress=not as_json, output=output_name, restore_peel=peel,
                        **({} if candidates is None else {"finetune_candidates": candidates}))
    report = result.to_json()
    if plot_path:
        from .plots import plot_repair

        plot_repair(report, plot_path)
        report["plot"] = plot_path
    from .report import repair_tables

    emit_report(report, report_path, as_json, repair_tables)
    if not result.accepted:
        click.echo(f"lancet: repair rejected: {'; '.join(result.reasons)}"
                   + ("; written anyway (--force)" if result.written else "; nothing written"), err=True)
        sys.exit(3)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise LancetError("plots need matplotlib: pip install 'onnx-lancet[plot]'") from exc


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
