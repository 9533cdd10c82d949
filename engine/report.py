"""Readable tables for people (rich); JSON is produced by the callers."""
from __future__ import annotations

from typing import Any


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
        table.add_row(str(key), _fmt(value))
    console.print(table)


def inspect_tables(info: dict, console) -> None:
    """`lancet inspect` for people: model facts, the layer table, and op coverage."""
    from rich.table import Table

    facts = {
        "file": info["path"], "producer": info["producer"], "opset": info["opset"], "nodes": info["nodes"],
        "inputs": ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in info["inputs"]),
        "outputs": ", ".join(f"{o['name']} {o['shape']} {o['dtype']}" for o in info["outputs"]),
        "parameters": info["parameters"], "channel neurons": info["channel_neurons"],
        "weight neurons": info["weight_neurons"],
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
