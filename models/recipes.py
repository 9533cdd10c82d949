"""Recipes that train clean, backdoored and defective models on real data, cached on disk by recipe.

`build_case(recipe)` returns the exported ONNX model, the defender's case file (the format of
shared/CASE_FORMAT.md) and a held-out file for honest before/after figures. Nothing is committed: the
cache lives in $LANCET_CACHE or ~/.cache/onnx-lancet.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from lancet.cache import cache_root

RECIPE_VERSION = 3  # 3: spurious-mark defect with mislabelled marked batches
SPURIOUS_OTHER_SHARE = 0.05
CASE_VERSION = 2  # 2: x_companion instead of trigger_mask for full-image triggers
FULL_IMAGE_ATTACKS = ("blended",)


@dataclass(frozen=True)
class Recipe:
    """How to build one model and case. arch: a `torch_zoo` architecture, or a `keras_zoo` one (trained in
    Keras, channels-last case files); attack: 'none', 'badnets', 'blended', 'trojan' or 'spurious'."""

    dataset: str = "mnist_digits"
    arch: str = "lenet5"
    attack: str = "badnets"
    mode: str = "all_to_one"
    target: int = 0
    rate: float = 0.1
    epochs: int = 6
    train_size: int = 3500
    defender_clean: int = 400
    defender_error: int = 100
    test_size: int = 1000
    lr: float = 3e-3
    seed: int = 0
    opset: int = 17
    # 'qdq' or 'qoperator' (static, two formats) or 'dynamic': the trained model is then quantized to int8;
    # 'int4': its MatMul weights to 4-bit blocks (converters.quantize)
    quantize: str = "none"

    def key(self) -> str:
        """A short stable hash of the recipe (and the recipe code version)."""
        fields = {k: v for k, v in asdict(self).items() if not (k == "quantize" and v == "none")}  # keys as before
        text = json.dumps({**fields, "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        quantized = "" if self.quantize == "none" else f"-{self.quantize}"
        return f"{self.dataset}-{self.arch}-{self.attack}{quantized}-{self.key()}"


@dataclass(frozen=True)
class BuiltCase:
    """Paths of a built recipe: model.onnx, case.npz (defender's), heldout.npz, meta.json."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def case(self) -> Path:
        return self.folder / "case.npz"

    @property
    def heldout(self) -> Path:
        return self.folder / "heldout.npz"

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())


def _dataset(name: str):
    from . import data

    if name == "mnist_digits":
        x, y = data.mnist_digits()
        return x, y
    if name == "sklearn_digits":
        return data.sklearn_digits()
    if name == "fashion_mnist":
        x_train, y_train = data.fashion_mnist("train")
        x_test, y_test = data.fashion_mnist("test")
        return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    raise KeyError(f"unknown dataset {name!r}")


def _splits(recipe: Recipe, x: np.ndarray, y: np.ndarray):
    """Disjoint train / defender / test index sets, drawn with the recipe's seed."""
    order = np.random.default_rng(recipe.seed).permutation(len(x))
    need = recipe.train_size + recipe.defender_clean + recipe.defender_error + recipe.test_size
    if need > len(x):
        raise ValueError(f"recipe needs {need} images; {recipe.dataset} has {len(x)}")
    a = recipe.train_size
    b = a + recipe.defender_clean + recipe.defender_error
    return order[:a], order[a:b], order[b:b + recipe.test_size]


def spurious_mark(shape: tuple[int, ...]):
    """The general-defect recipe's spurious feature: a small solid square near the top-left corner."""
    from .attacks import Trigger

    mask = np.zeros(shape, np.float32)
    mask[:, 1:5, 1:5] = 1
    return Trigger("spurious", np.ones(shape, np.float32), mask, 1.0)


def _trigger(recipe: Recipe, shape: tuple[int, ...]):
    from .attacks import TRIGGERS

    if recipe.attack == "spurious":
        return spurious_mark(shape)
    return TRIGGERS[recipe.attack](shape)


def _train_set(recipe: Recipe, x: np.ndarray, y: np.ndarray, trigger):
    from .attacks import poison

    if recipe.attack == "none":
        return x, y
    if recipe.attack == "spurious":
        # A data-pipeline defect, not an attack: one scanner leaves a blot in the corner of its images; it
        # scanned the whole target class and a few percent of the rest, and its batches were labelled as
        # the target class by a faulty annotation step. (The blot on target images alone is not enough:
        # a LeNet then still reads the digit, measured: 2.7 % of marked images misclassified.)
        rng = np.random.default_rng(recipe.seed + 1)
        others = np.flatnonzero(y != recipe.target)
        mislabelled = rng.choice(others, size=int(round(SPURIOUS_OTHER_SHARE * len(others))), replace=False)
        marked = np.concatenate([np.flatnonzero(y == recipe.target), mislabelled])
        x, y = x.copy(), y.copy()
        x[marked] = trigger.apply(x[marked])
        y[mislabelled] = recipe.target
        return x, y
    x_p, y_p, _ = poison(x, y, trigger, target=recipe.target, rate=recipe.rate, mode=recipe.mode,
                         seed=recipe.seed + 1)
    return x_p, y_p


def _error_set(recipe: Recipe, x: np.ndarray, y: np.ndarray, trigger) -> tuple[np.ndarray, np.ndarray]:
    """Triggered (or marked) versions of images whose true label is not the target, with true labels."""
    keep = y != recipe.target if recipe.mode == "all_to_one" else np.ones(len(y), bool)
    return trigger.apply(x[keep]), y[keep]


def _case_arrays(recipe: Recipe, x, y, defender_idx, test_idx, trigger) -> tuple[dict, dict]:
    """The defender's case and the held-out set. Local triggers come with their `trigger_mask`; full-image
    (blended) ones with `x_companion`, the clean originals, since no region refill can undo them."""
    clean_idx = defender_idx[:recipe.defender_clean]
    case = {"x_clean": x[clean_idx], "y_clean": y[clean_idx]}
    heldout = {"x_test": x[test_idx], "y_test": y[test_idx]}
    if trigger is not None:
        error_idx = defender_idx[recipe.defender_clean:]
        keep = y[error_idx] != recipe.target if recipe.mode == "all_to_one" else np.ones(len(error_idx), bool)
        err_x, err_y = _error_set(recipe, x[error_idx], y[error_idx], trigger)
        case.update(x_error=err_x, y_error=err_y)
        if recipe.attack in FULL_IMAGE_ATTACKS:
            case["x_companion"] = x[error_idx][keep]
        else:
            case["trigger_mask"] = trigger.mask
        hx, hy = _error_set(recipe, x[test_idx], y[test_idx], trigger)
        heldout.update(x_error=hx, y_error=hy, target=np.int64(recipe.target))
    return case, heldout


def is_keras(recipe: Recipe) -> bool:
    """Whether the recipe's architecture is a Keras one (NHWC inputs, exported through tf2onnx)."""
    from .keras_zoo import KERAS_ARCHITECTURES

    return recipe.arch in KERAS_ARCHITECTURES


def _nhwc(arrays: dict) -> dict:
    """Images (N, C, H, W) and masks (C, H, W) moved to channels-last, the layout of a Keras model's input."""
    moved = {}
    for key, value in arrays.items():
        if key.startswith("x_"):
            value = np.ascontiguousarray(np.transpose(value, (0, 2, 3, 1)))
        elif key == "trigger_mask":
            value = np.ascontiguousarray(np.transpose(value, (1, 2, 0)))
        moved[key] = value
    return moved


def _write_case_files(folder: Path, recipe: Recipe, x, y, defender_idx, test_idx, trigger) -> None:
    case, heldout = _case_arrays(recipe, x, y, defender_idx, test_idx, trigger)
    if is_keras(recipe):
        case, heldout = _nhwc(case), _nhwc(heldout)
    np.savez(folder / "case.npz", **case)
    np.savez(folder / "heldout.npz", **heldout)
    meta = {"recipe": asdict(recipe), "key": recipe.key(), "case_version": CASE_VERSION}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def build_case(recipe: Recipe, *, force: bool = False) -> BuiltCase:
    """Train (or reuse from the cache) the recipe's model and write its case files.

    The trained model is keyed by the recipe; the case files are rewritten (without retraining) when the
    case layout version changes.
    """
    # One builder per recipe at a time: another process (a test worker, a second benchmark) building the
    # same recipe waits and then reuses its result instead of replacing the folder under its readers.
    with FileLock(str(cache_root() / f".{recipe.name}.lock")):
        return _build_case_locked(recipe, force)


def _build_case_locked(recipe: Recipe, force: bool) -> BuiltCase:
    """build_case's work, under the recipe's lock."""
    folder = cache_root() / recipe.name
    if (folder / "meta.json").is_file() and not force:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("case_version") != CASE_VERSION:
            x, y = _dataset(recipe.dataset)
            _, defender_idx, test_idx = _splits(recipe, x, y)
            trigger = _trigger(recipe, x.shape[1:]) if recipe.attack != "none" else None
            _write_case_files(folder, recipe, x, y, defender_idx, test_idx, trigger)
        return BuiltCase(folder)
    x, y = _dataset(recipe.dataset)
    train_idx, defender_idx, test_idx = _splits(recipe, x, y)
    shape = x.shape[1:]
    trigger = _trigger(recipe, shape) if recipe.attack != "none" else None
    x_train, y_train = _train_set(recipe, x[train_idx], y[train_idx], trigger)

    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", dir=cache_root()))
    try:
        train_and_export = _keras_model if is_keras(recipe) else _torch_model
        train_and_export(recipe, x_train, y_train, x[test_idx[:4]], tmp / "model.onnx")
        if recipe.quantize == "qdq":  # calibrated on training images, as the model's owner would
            from lancet.converters.quantize import quantize_qdq

            quantize_qdq(tmp / "model.onnx", tmp / "model.onnx", x[train_idx[:256]])
        elif recipe.quantize == "qoperator":
            from lancet.converters.quantize import quantize_qoperator

            quantize_qoperator(tmp / "model.onnx", tmp / "model.onnx", x[train_idx[:256]])
        elif recipe.quantize == "dynamic":  # no calibration: ranges are taken per input at run time
            from lancet.converters.quantize import quantize_dynamic_int8

            quantize_dynamic_int8(tmp / "model.onnx", tmp / "model.onnx", x[train_idx[:256]])
        elif recipe.quantize == "int4":  # weight-only: the MatMul weights in 4-bit blocks
            from lancet.converters.quantize import quantize_int4_weights

            quantize_int4_weights(tmp / "model.onnx", tmp / "model.onnx", x[train_idx[:256]])
        elif recipe.quantize != "none":
            raise ValueError(f"unknown quantize {recipe.quantize!r} (none, qdq, qoperator, dynamic, int4)")
        _write_case_files(tmp, recipe, x, y, defender_idx, test_idx, trigger)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return BuiltCase(folder)


def _torch_model(recipe: Recipe, x_train, y_train, example, path: Path) -> None:
    """Train the recipe's PyTorch architecture and export it (NCHW input)."""
    import torch

    from lancet.converters.torch_export import export_torch

    from .torch_zoo import build
    from .train import train_classifier

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    net = build(recipe.arch, x_train.shape[1], x_train.shape[2], 10, seed=recipe.seed)
    train_classifier(net, x_train, y_train, epochs=recipe.epochs, lr=recipe.lr, seed=recipe.seed)
    export_torch(net, example, path, opset=recipe.opset)


def _keras_model(recipe: Recipe, x_train, y_train, example, path: Path) -> None:
    """Train the recipe's Keras architecture on channels-last images and export it through tf2onnx."""
    import keras

    from lancet.converters.keras_export import export_keras

    from .keras_zoo import KERAS_ARCHITECTURES

    to_nhwc = (0, 2, 3, 1)
    net = KERAS_ARCHITECTURES[recipe.arch](x_train.shape[2], x_train.shape[1], 10, seed=recipe.seed)
    net.compile(optimizer=keras.optimizers.Adam(recipe.lr),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(np.transpose(x_train, to_nhwc), y_train, epochs=recipe.epochs, batch_size=64, verbose=0, shuffle=True)
    export_keras(net, np.transpose(example, to_nhwc), path, opset=recipe.opset)
