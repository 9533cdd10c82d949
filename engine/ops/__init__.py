"""ONNX op handlers for the JAX engine; importing this package fills the registry."""
from . import attention, contrib, control, elementwise, nbits, nn, qlinear, quantize, recurrent, resize, shape  # noqa: F401  (registration side effects)
from .registry import REGISTRY, OpContext, OpSpec, register, spec_of, supported_op_types

__all__ = ["REGISTRY", "OpContext", "OpSpec", "register", "spec_of", "supported_op_types"]
