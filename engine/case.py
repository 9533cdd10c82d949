"""The user's case file (`case.npz`, see shared/CASE_FORMAT.md): loading without pickle, and validation.

Every error names the key at fault; unknown keys are ignored with a warning.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .ir import Model

KNOWN_KEYS = ("x_clean", "y_clean", "x_error", "y_error", "x_companion", "trigger_mask")


@dataclass
class Case:
    """Validated case arrays (None for an absent optional key)."""

    x_clean: np.ndarray
    y_clean: np.ndarray
    x_error: np.ndarray | None = None
    y_error: np.ndarray | None = None
    x_companion: np.ndarray | None = None
    trigger_mask: np.ndarray | None = None
    path: Path | None = None

    def save(self, path: str | Path) -> Path:
        """Write the case as an uncompressed npz (only the keys that are set)."""
        arrays = {key: getattr(self, key) for key in KNOWN_KEYS if getattr(self, key) is not None}
        path = Path(path)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
        return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BadInputError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {}
            for key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError as exc:  # an object array would need pickle
                    raise BadInputError(f"{path}: array {key!r} holds Python objects (pickle); "
                                        "only numeric arrays are accepted") from exc
            return arrays
    except BadInputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"{path} is not a readable .npz file: {exc}") from exc


def input_shape(model: Model) -> tuple[int | None, ...]:
    """The model input's shape without the batch axis (None for a symbolic dimension)."""
    shape = model.input.shape
    if shape is None:
        return ()
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape[1:])


def _check_images(key: str, array: np.ndarray, expected: tuple[int | None, ...], where: str,
                  pixels: np.dtype | None = None) -> np.ndarray:
    """`array` as float32 after the checks; `pixels`: the integer type of a model that takes integer
    pixels (uint8, ...), whose arrays may come in that type or as float32 holding its values."""
    if pixels is not None and array.dtype == pixels:
        array = array.astype(np.float32)
    if array.dtype != np.float32:
        needs = "float32" if pixels is None else f"{pixels} or float32 holding {pixels} values"
        raise BadInputError(f"{where}: {key!r} has dtype {array.dtype}; the model input needs {needs}")
    if array.ndim == 0 or array.shape[0] == 0:
        raise BadInputError(f"{where}: {key!r} is empty")
    if expected and (array.ndim != len(expected) + 1
                     or any(e is not None and e != d for e, d in zip(expected, array.shape[1:]))):
        shown = tuple("?" if e is None else e for e in expected)
        raise BadInputError(f"{where}: {key!r} has shape {array.shape}; the model input needs [N, "
                            f"{', '.join(map(str, shown))}]")
    if not np.all(np.isfinite(array)):
        raise BadInputError(f"{where}: {key!r} holds NaN or infinite values")
    if pixels is not None:
        info = np.iinfo(pixels)
        if np.any(array != np.rint(array)) or array.min() < info.min or array.max() > info.max:
            raise BadInputError(f"{where}: {key!r} holds values that are not {pixels} pixels (integers in "
                                f"{info.min}..{info.max}; found {array.min():g}..{array.max():g}): the model "
                                f"takes {pixels} images, not scaled ones")
    return array


def _check_labels(key: str, labels: np.ndarray, count: int, num_classes: int | None, where: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadInputError(f"{where}: {key!r} has dtype {labels.dtype}; labels must be integers (int64)")
    if labels.ndim != 1 or labels.shape[0] != count:
        raise BadInputError(f"{where}: {key!r} has shape {labels.shape}; expected [{count}] (one label per image)")
    if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise BadInputError(f"{where}: {key!r} holds labels outside the model's output range "
                            f"0..{(num_classes or 0) - 1} (found {labels.min()}..{labels.max()})")
    return labels.astype(np.int64)


def num_classes(model: Model) -> int | None:
    """The number of classes from the scores output's static shape, if known: [n, C], or [n, C, 1, 1] and
    the like (`forward.class_scores`); an output of one column, [n, 1], is a two-class model (a sigmoid or
    a logit: class 1 where it is high). An output with two axes beyond the batch, [n, C, H, W], is not a
    classifier's: refused, naming it."""
    shape = model.output.shape
    rest = list(shape[1:]) if shape else []
    if not rest or not all(isinstance(size, int) and size > 0 for size in rest):
        return None
    if sum(size > 1 for size in rest) > 1:
        raise BadInputError(f"output {model.output.name!r} has shape {list(shape)}: class scores are "
                            f"[n, classes] (with singleton axes at most, as [n, C, 1, 1]); name the scores "
                            f"with --output")
    count = int(np.prod(rest))
    return 2 if count == 1 else count


def validate_case(arrays: dict[str, np.ndarray], model: Model, where: str = "case") -> Case:
    """Check the arrays against the model's input and output; return a Case. Errors name the key."""
    for key in sorted(set(arrays) - set(KNOWN_KEYS)):
        warnings.warn(f"{where}: ignoring unknown key {key!r}", stacklevel=2)
    for key in ("x_clean", "y_clean"):
        if key not in arrays:
            raise BadInputError(f"{where}: missing key {key!r}")
    if ("x_error" in arrays) != ("y_error" in arrays):
        missing = "y_error" if "x_error" in arrays else "x_error"
        raise BadInputError(f"{where}: missing key {missing!r} (x_error and y_error go together)")
    if "x_companion" in arrays and "x_error" not in arrays:
        raise BadInputError(f"{where}: 'x_companion' given without 'x_error'")
    expected = input_shape(model)
    classes = num_classes(model)
    pixels = model.input.dtype if np.issubdtype(model.input.dtype, np.integer) else None
    x_clean = _check_images("x_clean", arrays["x_clean"], expected, where, pixels)
    y_clean = _check_labels("y_clean", arrays["y_clean"], len(x_clean), classes, where)
    case = Case(x_clean, y_clean)
    if "x_error" in arrays:
        case.x_error = _check_images("x_error", arrays["x_error"], expected, where, pixels)
        case.y_error = _check_labels("y_error", arrays["y_error"], len(case.x_error), classes, where)
    if "x_companion" in arrays:
        companion = _check_images("x_companion", arrays["x_companion"], expected, where, pixels)
        if companion.shape != case.x_error.shape:
            raise BadInputError(f"{where}: 'x_companion' has shape {companion.shape}; it must match "
                                f"'x_error' {case.x_error.shape}")
        case.x_companion = companion
    if "trigger_mask" in arrays:
        mask = arrays["trigger_mask"]
        if not np.issubdtype(mask.dtype, np.floating):
            raise BadInputError(f"{where}: 'trigger_mask' has dtype {mask.dtype}; expected float32")
        if mask.shape != x_clean.shape[1:]:
            raise BadInputError(f"{where}: 'trigger_mask' has shape {mask.shape}; expected the input shape "
                                f"{x_clean.shape[1:]} (no batch axis)")
        if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
            raise BadInputError(f"{where}: 'trigger_mask' must hold finite values in [0, 1]")
        if mask.max() == 0:
            raise BadInputError(f"{where}: 'trigger_mask' is all zeros")
        case.trigger_mask = mask.astype(np.float32)
    return case


def load_case(path: str | Path, model: Model) -> Case:
    """Load and validate a case file for `model`."""
    path = Path(path)
    case = validate_case(_read_npz(path), model, where=str(path))
    case.path = path
    return case
