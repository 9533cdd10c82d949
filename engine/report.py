"""Readable tables for people (rich); JSON is produced by the callers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_DICT_ITEMS = 12  # a table cell shows at most this many entries of a dict (of 1,000 classes: the lowest)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def key_value_table(title: str, data: dict, console) -> None:
    """A two-column table of a flat dict."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in data.items():
        if isinstance(value, dict):  # e.g. per-class accuracy: one compact line (the lowest values if long)
            long = len(value) > MAX_DICT_ITEMS
            items = sorted(value.items(), key=lambda item: item[1])[:MAX_DICT_ITEMS] if long else value.items()
            value = (f"lowest {MAX_DICT_ITEMS} of {len(value)}: " if long else "") + \
                ", ".join(f"{k}: {_fmt(v)}" for k, v in items)
        table.add_row(str(key), _fmt(value))
    console.print(table)


def _outside_line(outside: dict) -> str:
    if not outside["parameters"]:
        return "none"
    readers = ", ".join(f"{op} {count:,}" for op, count in outside["read_by"].items())
    return f"{outside['parameters']:,} (read by {readers}): no repair changes them"


QUANTIZATION_LINES = {
    "qdq": "QDQ (integer weights behind DequantizeLinear, activations fake-quantized)",
    "qoperator": "QOperator (quantized operators, computed as onnxruntime's integer kernels; weight neurons only)",
    "dynamic": "dynamic (activations quantized over each input's own range at run time: inputs run one at a time)",
    "int4-weights": "4-bit weights in blocks (DequantizeLinear or MatMulNBits; weight-only: activations in float)",
    "int8-weights": "8-bit weights in blocks (MatMulNBits; weight-only: activations in float)",
    "int2-weights": "2-bit weights in blocks (MatMulNBits; weight-only: activations in float)",
}


def inspect_tables(info: dict, console) -> None:
    """`lancet inspect` for people: model facts, the layer table, and op coverage."""
    from rich.table import Table

    facts = {
        "file": info["path"],
        "external data": ", ".join(f"{Path(e['file']).name} ({e['bytes'] / 2**20:.1f} MiB)"
                                   for e in info.get("external_data", [])) or "none (tensors inline)",
        "producer": info["producer"], "opset": info["opset"], "nodes": info["nodes"],
        "inputs": ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in info["inputs"]),
        "outputs": ", ".join(f"{o['name']} {o['shape']} {o['dtype']}" for o in info["outputs"]),
        "class scores": info["scores_output"],
        "parameter types": ", ".join(f"{count} {dtype}" for dtype, count in info["parameter_dtypes"].items())
        + (" (computed in float32)" if set(info["parameter_dtypes"]) - {"float32"} else ""),
        "parameters": info["parameters"], "channel neurons": info["channel_neurons"],
        "weight neurons": info["weight_neurons"],
        "parameters outside layers": _outside_line(info["outside_layers"]),
        "quantized format": (QUANTIZATION_LINES.get(info["quantization"], info["quantization"]) if info["quantization"]
                             else "none (float)"),
        "batch": ("free" if not info["batch"]["fixed"] else
                  f"fixed at {info['batch']['fixed']}" + (" and written into the graph (runs vmapped over groups of it)"
                                                           if info["batch"]["hard_coded"] else " (runs on any batch)"))
        + (f"; each input runs alone: {info['batch']['coupled_by']} couples a batch's inputs"
           if info["batch"].get("coupled_by") else ""),
    }
    key_value_table("model", facts, console)
    layers = Table(title="neuron layers")
    for column in ("#", "layer tensor", "op", "channels", "weight", "weight shape", "params"):
        layers.add_column(column, justify="right" if column in ("#", "channels", "params") else "left")
    for index, layer in enumerate(info["layers"]):
        layers.add_row(str(index), layer["name"], layer["op_type"], str(layer["channels"]), layer["weight"],
                       "x".join(map(str, layer["weight_shape"])), str(layer["parameters"]))
    console.print(layers)
    ops = Table(title="op coverage")
    ops.add_column("op")
    ops.add_column("nodes", justify="right")
    ops.add_column("supported")
    for op, entry in info["op_coverage"].items():
        ops.add_row(op, str(entry["count"]), "yes" if entry["supported"] else "NO")
    console.print(ops)


def _stage_line(seconds: dict) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items())


def locate_tables(report: dict, console, top: int = 20) -> None:
    """`lancet locate` for people: outcome, pairs, restored trigger, EINs per layer and the top EINs."""
    from rich.table import Table

    facts = {"model": report["model"], "status": report["status"], "granularity": report["granularity"],
             "clean accuracy": report["clean_accuracy"]}
    if report.get("restore"):
        restore = report["restore"]
        flagged = restore.get("flagged_triggers", restore["flagged_classes"])  # 's->t' when source-specific
        facts["restored trigger: flagged classes"] = ", ".join(map(str, flagged)) or "none"
        facts["trigger model"] = restore["trigger_kind"]
        facts["anomaly index (max)"] = max(restore["anomaly_index"])
        if restore.get("peeled"):
            facts["peeled parts"] = _peeled_line(restore["peeled"])
    if report.get("pairs"):
        pairs = report["pairs"]
        facts["pairs"] = f"{pairs['used']} used of {pairs['given']} ({pairs['source']}), {pairs['dropped']} dropped"
    if "chosen" in report:
        chosen = report["chosen"]
        facts["EINs"] = (f"{report['ein_count']} of {report['total_neurons']} neurons "
                         f"({100 * report['ein_share']:.3f} %), scope {chosen['scope']}")
        facts["error-fix rate (pairs)"] = chosen["fix_rate"]
        facts["clean accuracy after ablation"] = chosen["clean_accuracy"]
        facts["within bounds"] = "yes" if chosen["success"] else "NO"
    facts["seconds"] = _stage_line(report["seconds"])
    key_value_table("lancet locate", facts, console)
    if not report.get("eins"):
        return
    key = "initializer" if report["granularity"] == "weight" else "layer"
    table = Table(title=f"top {min(top, len(report['eins']))} EINs (of {len(report['eins'])})")
    for column in ("rank", key, "index", "score"):
        table.add_column(column, justify="left" if column == key else "right")
    for rank, ein in enumerate(report["eins"][:top], 1):
        table.add_row(str(rank), ein[key], str(ein["index"]), f"{ein['score']:.4g}")
    console.print(table)


def _peeled_line(peeled: dict) -> str:
    """The trigger parts peeled after each flagged class's (`--peel`): size and anomaly index of each."""
    return "; ".join(f"class {label}: " + ", ".join(f"{p['norm']:.1f} px (index {p['anomaly_index']:.2f})"
                                                    for p in parts) for label, parts in peeled.items())


def repair_tables(report: dict, console) -> None:
    """`lancet repair` for people: the before/after table and the outcome."""
    from rich.table import Table

    table = Table(title=f"lancet repair ({report['method']}): {report['status']}")
    table.add_column("metric (given data)")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for metric in ("clean_accuracy", "error_accuracy", "error_fix_rate"):
        if metric in report.get("before", {}) or metric in report.get("after", {}):
            table.add_row(metric, _fmt(report["before"].get(metric, "")), _fmt(report["after"].get(metric, "")))
    console.print(table)
    facts = {"EINs": report["ein_count"]}
    worst = report.get("after", {}).get("largest_class_drop")
    if worst:
        facts["class losing most (x_clean)"] = (
            f"class {worst['class']}: {_fmt(worst['before'])} -> {_fmt(worst['after'])} "
            f"({worst['drop_points']:.1f} points down; {worst['images']} images)" if worst["drop_points"] > 0
            else "none: no class of x_clean loses accuracy")
    if "finetune_neurons" in report:
        start = (report.get("finetune") or {}).get("start")
        facts["fine-tuned neurons"] = (f"{report['finetune_neurons']} (top of scope {report.get('finetune_scope')}"
                                       + (f"; trained from {'zero' if start == 'ablated' else 'their values'}"
                                          if start else "") + ")")
    held = report.get("after", {}).get("heldback_error")
    if held:
        facts["error inputs held back"] = (
            f"{held['fixed']}/{held['inputs']} fixed (never trained on; at 95 % confidence at most "
            f"{100 * held['unfixed_upper_95']:.1f} % of such inputs stay wrong)")
    peeled = (report.get("locate", {}).get("restore") or {}).get("peeled")
    if peeled:
        facts["peeled trigger parts"] = _peeled_line(peeled)
    if "residual_trigger" in report:
        residual = report["residual_trigger"]
        facts["residual trigger"] = "; ".join(
            f"class {c}: {before:.4g} -> {after:.4g} (anomaly index {i_before:.2f} -> {i_after:.2f})"
            for c, before, after, i_before, i_after in zip(residual.get("labels", residual["classes"]),
                                                            residual["norms_before"],
                                                            residual["norms"], residual["anomaly_indices_before"],
                                                            residual["anomaly_indices"]))
    facts |= {"changed parameters": report["changed_parameter_count"],
              "pairs": f"{report['pairs_used']} used, {report['pairs_dropped']} dropped",
              "output": (" + ".join(report.get("files_written") or [report["output"]]) if report["written"]
                         else "not written"),
              "seconds": _stage_line(report["seconds"])}
    if report["reasons"]:
        facts["reasons"] = "; ".join(report["reasons"])
    key_value_table("outcome", facts, console)
    if len(report.get("finetune_tried", [])) > 1:
        finetune_candidates_table(report["finetune_tried"], console)


def finetune_candidates_table(tried: list[dict], console) -> None:
    """The candidate sets fine-tuning trained, with what the pick weighed (held-back accuracy, fix rate on
    the given error inputs, residual trigger, depth), so a reader sees why the kept one was kept."""
    from rich.table import Table

    table = Table(title="fine-tuning candidates (* kept; the deepest accepted set within the tolerances, a dense "
                        "layer on the input pixels first)")
    residuals = [(attempt.get("residual_trigger") or {}).get("anomaly_index") for attempt in tried]
    grown = len({attempt.get("margin") for attempt in tried}) > 1  # sets trained again, larger (repair.py)
    columns = ["", "scope", "depth", "neurons", "accepted", "x_clean acc", "held-back acc", "fix rate"]
    for column in columns + (["residual index"] if any(r is not None for r in residuals) else []):
        table.add_column(column, justify="left" if column in ("", "scope") else "right")
    for attempt, residual in zip(tried, residuals):
        fix_rate = attempt.get("error_fix_rate")
        depth = str(attempt.get("depth", "")) + (" (on pixels)" if attempt.get("reads_pixels") else "")
        neurons = str(attempt["neurons"]) + (f" ({attempt['margin']:g}x k)" if grown else "")
        row = ["*" if attempt.get("chosen") else "", str(attempt["scope"]), depth,
               neurons, "yes" if attempt["accepted"] else "no", _fmt(attempt["clean_accuracy"]),
               _fmt(attempt["heldback_accuracy"]), "" if fix_rate is None else _fmt(fix_rate)]
        if len(table.columns) > len(columns):
            row.append("" if residual is None else f"{residual:.2f}")
        table.add_row(*row)
    console.print(table)
