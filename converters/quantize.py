"""Float ONNX model -> QDQ-quantized ONNX model, as a deployment pipeline quantizes for int8 CPUs.

onnxruntime's static quantizer in its recommended QDQ format: int8 weights (per output channel or per
tensor) and int32 biases behind DequantizeLinear, uint8 activations through QuantizeLinear/DequantizeLinear,
activation ranges calibrated on the given images. Checked before it is written: the quantized model's labels
agree with the float model's on the calibration images (at least `min_agreement`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lancet.runtime import ort_session

from . import ConversionError, written_atomically


def quantize_qdq(source: str | Path, path: str | Path, calibration: np.ndarray, *, per_channel: bool = True,
                 batch: int = 32, min_agreement: float = 0.9) -> Path:
    """Write the QDQ-quantized `source` to `path` (atomically), calibrated on `calibration` images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    source, path = Path(source), Path(path)
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    float_session = ort_session(source)
    input_name = float_session.get_inputs()[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{input_name: calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.items, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer advises its pre-processing on the root logger each call
    try:
        with written_atomically(path, f"quantizing {source} to {path}") as tmp:
            quantize_static(str(source), str(tmp), Batches(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            float_labels = float_session.run(None, {input_name: calibration})[0].argmax(1)
            quantized_labels = ort_session(tmp).run(None, {input_name: calibration})[0].argmax(1)
            agreement = float(np.mean(float_labels == quantized_labels))
            if agreement < min_agreement:
                raise ConversionError(f"quantized {source} agrees with the float model on {agreement:.1%} of "
                                      f"the calibration images (< {min_agreement:.0%})")
    finally:
        root.setLevel(level)
    return path
