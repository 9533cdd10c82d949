"""onnx-lancet: locate and repair the error-inducing neurons of ONNX classifiers (AI-Lancet) in JAX."""
from __future__ import annotations

from .cache import enable_compile_cache
from .errors import BadInputError, LancetError, RepairRejectedError, UnsupportedOpError
from .forward import Edit, Forward, build_apply
from .ir import Model, Node, TensorInfo
from .loader import load_model

__version__ = "0.1.0"

__all__ = ["BadInputError", "Edit", "Forward", "LancetError", "Model", "Node", "RepairRejectedError",
           "TensorInfo", "UnsupportedOpError", "__version__", "build_apply", "enable_compile_cache", "load_model"]
