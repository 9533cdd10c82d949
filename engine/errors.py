"""Exceptions that the CLI turns into a one-line message and an exit code (never a traceback)."""
from __future__ import annotations


class LancetError(Exception):
    """Base class: anything the user can act on. `exit_code` is what the CLI exits with."""

    exit_code = 2


class BadInputError(LancetError):
    """A model file, data file, key, node or option that cannot be used; the message names it."""

    exit_code = 2


class UnsupportedOpError(BadInputError):
    """The model uses op types the JAX engine has no handler for (all of them listed at once)."""

    def __init__(self, unsupported: dict[str, list[str]]):
        self.unsupported = unsupported
        parts = [f"{op} (nodes: {', '.join(nodes[:5])}{', ...' if len(nodes) > 5 else ''})"
                 for op, nodes in sorted(unsupported.items())]
        super().__init__("unsupported ONNX op types: " + "; ".join(parts))


class RepairRejectedError(LancetError):
    """The repair missed its acceptance bounds; nothing was written."""

    exit_code = 3


class NodeFailedError(BadInputError):
    """An op handler could not run a node (shapes or attributes it cannot take); names the node."""
