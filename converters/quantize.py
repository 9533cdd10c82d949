"""Float ONNX model -> int8-quantized ONNX model, as a deployment pipeline quantizes for CPUs.

onnxruntime's quantizers:

* `quantize_qdq`: static quantization in its recommended QDQ format: int8 weights (per output channel or
  per tensor) and int32 biases behind DequantizeLinear, uint8 activations through QuantizeLinear/
  DequantizeLinear, activation ranges calibrated on the given images;
* `quantize_qoperator`: the same static quantization written as quantized operators (QLinearConv,
  com.microsoft QGemm, QLinearAdd, ...) on uint8 tensors;
* `quantize_dynamic_int8`: dynamic quantization: int8 weights read by ConvInteger and MatMulInteger
  (Gemm layers become MatMulInteger), each activation quantized to uint8 over its own range at run time
  (DynamicQuantizeLinear), float biases; no calibration;
* `quantize_int4_weights`: weight-only 4-bit quantization of MatMul weights (onnxruntime's
  MatMulNBitsQuantizer, as transformer models are shrunk): uint4 weights in blocks along the input
  dimension, each block with its scale and zero point, behind an opset-21 DequantizeLinear (QDQ format)
  or in com.microsoft MatMulNBits; activations stay float.

Checked before it is written: the quantized model's labels agree with the float model's on the given
images (at least `min_agreement`).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lancet.runtime import ort_session

from . import ConversionError, written_atomically


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizers advise their pre-processing on the root logger each call: keep that off."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _labels(session, input_name: str, images: np.ndarray, one_at_a_time: bool) -> np.ndarray:
    if one_at_a_time:  # a dynamically quantized model's ranges span its batch: as deployed per request
        return np.concatenate([session.run(None, {input_name: images[i:i + 1]})[0] for i in range(len(images))]
                              ).argmax(1)
    return session.run(None, {input_name: images})[0].argmax(1)


def _quantized_checked(source: Path, path: Path, images: np.ndarray, min_agreement: float, what: str,
                       quantize: Callable[[Path, Path, str], None], one_at_a_time: bool = False) -> Path:
    """Run `quantize(source, tmp, input name)` into a temporary file, check its labels against the float
    model's on `images`, and rename it onto `path`."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    float_session = ort_session(source)
    input_name = float_session.get_inputs()[0].name
    with _quiet_root_logger(), written_atomically(path, f"quantizing {source} to {path} ({what})") as tmp:
        quantize(source, tmp, input_name)
        float_labels = _labels(float_session, input_name, images, one_at_a_time)
        quantized_labels = _labels(ort_session(tmp), input_name, images, one_at_a_time)
        agreement = float(np.mean(float_labels == quantized_labels))
        if agreement < min_agreement:
            raise ConversionError(f"quantized {source} ({what}) agrees with the float model on {agreement:.1%} "
                                  f"of the check images (< {min_agreement:.0%})")
    return path


def _quantize_static(source: str | Path, path: str | Path, calibration: np.ndarray, quant_format_name: str,
                     per_channel: bool, batch: int, min_agreement: float) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)

    def quantize(source: Path, tmp: Path, input_name: str) -> None:
        class Batches(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{input_name: calibration[i:i + batch]}
                                   for i in range(0, len(calibration), batch)])

            def get_next(self):
                return next(self.items, None)

        quantize_static(str(source), str(tmp), Batches(), quant_format=getattr(QuantFormat, quant_format_name),
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    return _quantized_checked(Path(source), Path(path), calibration, min_agreement, f"static, {quant_format_name}",
                              quantize)


def quantize_qdq(source: str | Path, path: str | Path, calibration: np.ndarray, *, per_channel: bool = True,
                 batch: int = 32, min_agreement: float = 0.9) -> Path:
    """Write the QDQ-quantized `source` to `path` (atomically), calibrated on `calibration` images."""
    return _quantize_static(source, path, calibration, "QDQ", per_channel, batch, min_agreement)


def quantize_qoperator(source: str | Path, path: str | Path, calibration: np.ndarray, *, per_channel: bool = True,
                       batch: int = 32, min_agreement: float = 0.9) -> Path:
    """Write `source` statically quantized in the QOperator format to `path` (atomically), calibrated on
    `calibration` images: QLinearConv, QLinearMatMul and com.microsoft QGemm layers with int8 weights and
    int32 biases, and quantized elementwise and pooling ops (QLinearAdd, QLinearAveragePool, ...) between them."""
    return _quantize_static(source, path, calibration, "QOperator", per_channel, batch, min_agreement)


def quantize_dynamic_int8(source: str | Path, path: str | Path, check: np.ndarray, *, per_channel: bool = False,
                          min_agreement: float = 0.9) -> Path:
    """Write the dynamically quantized `source` to `path` (atomically): int8 weights (per tensor, or per
    output channel where onnxruntime supports it: MatMulInteger's columns), activations quantized at run
    time; labels checked on `check` images, each run alone."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(source: Path, tmp: Path, input_name: str) -> None:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel)

    return _quantized_checked(Path(source), Path(path), check, min_agreement, "dynamic", quantize,
                              one_at_a_time=True)


def quantize_int4_weights(source: str | Path, path: str | Path, check: np.ndarray, *, block_size: int = 32,
                          quant_format: str = "qdq", min_agreement: float = 0.9, bits: int = 4) -> Path:
    """Write `source` with its MatMul weights quantized to uint4 in blocks of `block_size` along the input
    dimension (asymmetric: a scale and zero point per block and output column) to `path` (atomically);
    labels checked on `check` images. `quant_format`: 'qdq' (DequantizeLinear with block_size, opset 21)
    or 'nbits' (com.microsoft MatMulNBits, the quantizer's default). `bits`: 2 or 8 instead of 4 (the
    'nbits' format only: onnxruntime's QDQ format takes 4 bits only). Gemm layers are left in float, as
    onnxruntime's quantizer leaves them."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    formats = {"qdq": (QuantFormat.QDQ, "DequantizeLinear"), "nbits": (QuantFormat.QOperator, "MatMulNBits")}
    if quant_format not in formats:
        raise ValueError(f"unknown quant_format {quant_format!r} ({', '.join(formats)})")
    fmt, written_op = formats[quant_format]
    if bits not in (2, 4, 8) or (bits != 4 and quant_format != "nbits"):
        raise ValueError(f"bits={bits} with quant_format {quant_format!r}: 4 bits in either format, 2 or 8 in "
                         "'nbits' only")

    def quantize(source: Path, tmp: Path, input_name: str) -> None:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=block_size,
                                         is_symmetric=False, quant_format=fmt)
        quantizer.process()
        if not any(node.op_type == written_op for node in quantizer.model.model.graph.node):
            raise ConversionError(f"{source} has no MatMul weight to quantize to {bits} bits (Gemm layers are "
                                  "left in float)")
        quantizer.model.save_model_to_file(str(tmp), False)

    return _quantized_checked(Path(source), Path(path), check, min_agreement,
                              f"int{bits} blocks of {block_size}, {quant_format}", quantize)
